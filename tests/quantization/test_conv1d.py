"""GPT-2 style transformers Conv1D layers are replaced by equivalent nn.Linear layers and quantized."""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from lightning_dynq.quantization import QuantRecipe  # noqa: E402
from lightning_dynq.quantization.backend import QuantBoundary  # noqa: E402
from lightning_dynq.quantization.convert import convert_copy  # noqa: E402
from lightning_dynq.quantization.prepare import linearize_transposed_conv1d, prepare_model  # noqa: E402


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config).eval()


def test_linearized_conv1d_computes_same_output():
    model = tiny_gpt2()
    tokens = torch.randint(0, 100, (2, 11))
    with torch.no_grad():
        expected = model(tokens).logits

    replaced = linearize_transposed_conv1d(model)

    assert len(replaced) == 8  # c_attn, c_proj, mlp.c_fc, mlp.c_proj in each of 2 blocks
    assert type(model.transformer.h[0].attn.c_attn) is nn.Linear
    assert model.transformer.h[0].attn.c_attn.weight.shape == (96, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, expected)


def test_gpt2_prepares_trains_and_converts():
    model = tiny_gpt2().train()
    preparation = prepare_model(model, QuantRecipe())

    assert len(preparation.linearized) == 8
    assert len(preparation.quantized) == 8
    assert isinstance(model.transformer.h[1].mlp.c_fc, QuantBoundary)
    # The output layer shares its weight with the token embedding, so both stay float and tied.
    assert "lm_head" in preparation.kept_float
    assert model.lm_head.weight is model.transformer.wte.weight

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for length in (5, 9, 13):
        tokens = torch.randint(0, 100, (4, length))
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    model.eval()
    int8 = convert_copy(model, engine="fbgemm")
    torch.backends.quantized.engine = "fbgemm"
    assert int8.lm_head.weight is int8.transformer.wte.weight
    for length in (3, 17):  # lengths no training batch had
        tokens = torch.randint(0, 100, (2, length))
        with torch.no_grad():
            fake_quant = model(tokens).logits
            quantized = int8(tokens).logits
        assert quantized.shape == (2, length, 100)
        assert torch.isfinite(quantized).all()
        assert (quantized - fake_quant).abs().max() < 0.25
