"""Dynamic mode: fake quantization follows each input's range, as the int8 dynamic Linear does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_dynq.quantization import QuantRecipe, backend
from lightning_dynq.quantization.convert import convert_copy
from lightning_dynq.quantization.prepare import prepare_model


def trained_dynamic_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).train()
    prepare_model(model, QuantRecipe(mode="dynamic"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(20):
        loss = model(torch.randn(8, 64)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_dynamic_activation_range_matches_fbgemm_kernel():
    model = trained_dynamic_mlp()
    activations = [m for _, m in backend.fake_quants(model) if backend.is_per_batch(m)]

    assert len(activations) == 2
    # fbgemm's dynamic Linear quantizes inputs with reduce_range=True: 0..127.
    assert all(m.quant_min == 0 and m.quant_max == 127 for m in activations)


def test_dynamic_observers_stay_on_when_frozen():
    model = trained_dynamic_mlp()
    backend.enable_observers(model, False)

    flags = {name: bool(m.observer_enabled[0]) for name, m in backend.fake_quants(model)}
    per_batch = {name for name, m in backend.fake_quants(model) if backend.is_per_batch(m)}
    assert per_batch
    for name, enabled in flags.items():
        assert enabled == (name in per_batch), name


@pytest.mark.parametrize("input_scale", [0.1, 1.0, 10.0])
def test_dynamic_int8_matches_fake_quant_at_any_scale(input_scale):
    model = trained_dynamic_mlp()
    backend.enable_observers(model, False)
    int8 = convert_copy(model, engine="fbgemm")
    torch.backends.quantized.engine = "fbgemm"

    torch.manual_seed(1)
    inputs = torch.randn(4, 64) * input_scale
    with torch.no_grad():
        fake_quant = model(inputs)
        quantized = int8(inputs)

    relative_error = (quantized - fake_quant).abs().max() / fake_quant.abs().max()
    assert relative_error < 0.01


def test_dynamic_weights_get_one_scale_per_output_channel():
    model = trained_dynamic_mlp()
    backend.enable_observers(model, False)
    first_weight_fake_quant = model[0].module.weight_fake_quant
    expected_scales = first_weight_fake_quant.scale.clone()

    int8 = convert_copy(model, engine="fbgemm")
    weight = int8[0].module.weight()

    assert expected_scales.shape == (256,)
    assert weight.qscheme() == torch.per_channel_affine
    torch.testing.assert_close(weight.q_per_channel_scales().float(), expected_scales.float())
    assert weight.q_per_channel_axis() == 0
