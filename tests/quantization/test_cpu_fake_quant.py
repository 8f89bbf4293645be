"""The CPU fake-quant classes give the same values, gradients and ranges as torch's FakeQuantize."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_dynq.quantization import backend

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import torch.ao.quantization as tq


def stock_fake_quant(constructor):
    """Build the torch FakeQuantize with the same arguments and the stock observer class."""
    keywords = dict(constructor.p.keywords)
    if keywords.get("observer") is backend.CPUPerChannelMinMaxObserver:
        keywords["observer"] = tq.MovingAveragePerChannelMinMaxObserver
    return tq.FakeQuantize(**keywords)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("role", ["activation", "weight"])
def test_cpu_fake_quant_matches_torch_bit_for_bit(mode, role):
    constructor = getattr(backend.make_qconfig(mode, "fbgemm"), role)
    ours, stock = constructor(), stock_fake_quant(constructor)
    assert type(ours) is backend.CPUFakeQuantize
    generator = torch.Generator().manual_seed(0)
    clamped_shares = []
    for step in range(4):
        shape = (96, 48) if role == "weight" else (4, 16, 48)
        # The input grows each step, so moving-average ranges lag behind and values get clamped.
        x = torch.randn(shape, generator=generator) * (step + 1)
        x_ours, x_stock = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ours, y_stock = ours(x_ours), stock(x_stock)
        grad = torch.randn(shape, generator=generator)
        y_ours.backward(grad)
        y_stock.backward(grad)
        assert torch.equal(y_ours, y_stock)
        assert torch.equal(x_ours.grad, x_stock.grad)
        assert torch.equal(ours.scale, stock.scale)
        assert torch.equal(ours.zero_point, stock.zero_point)
        clamped_shares.append(float((x_ours.grad == 0).float().mean()))
    if mode == "static" or role == "weight":
        # Later steps clamp values, so the zero-gradient mask is exercised, not only the identity.
        assert clamped_shares[-1] > 0.05
    else:
        # A dynamic activation range is recomputed from each batch, so nothing is clamped.
        assert clamped_shares == [0.0, 0.0, 0.0, 0.0]


def test_cpu_fake_quant_keeps_engine_default_settings():
    default = tq.get_default_qat_qconfig("fbgemm")
    ours = backend.make_qconfig("static", "fbgemm")
    for role in ("activation", "weight"):
        expected, built = getattr(default, role)(), getattr(ours, role)()
        assert (built.quant_min, built.quant_max) == (expected.quant_min, expected.quant_max)
        assert (built.dtype, built.qscheme, built.ch_axis) == (expected.dtype, expected.qscheme, expected.ch_axis)
        assert built.activation_post_process.averaging_constant == expected.activation_post_process.averaging_constant
    # fbgemm activations use 7 of the 8 bits; weights are symmetric int8 per output channel.
    activation, weight = ours.activation(), ours.weight()
    assert (activation.quant_min, activation.quant_max) == (0, 127)
    assert (weight.quant_min, weight.quant_max, weight.qscheme) == (-128, 127, torch.per_channel_symmetric)


def test_cpu_fake_quant_frozen_observer():
    fake_quant = backend.make_qconfig("static", "fbgemm").activation()
    fake_quant(torch.linspace(-1.0, 3.0, 64))
    scale, zero_point = fake_quant.scale.clone(), fake_quant.zero_point.clone()
    fake_quant.disable_observer()
    out = fake_quant(torch.linspace(-10.0, 30.0, 64))
    assert torch.equal(fake_quant.scale, scale)
    assert torch.equal(fake_quant.zero_point, zero_point)
    # Values outside the frozen range [-1, 3] are clamped to it, within one step.
    assert float(out.min()) == pytest.approx(-1.0, abs=float(scale))
    assert float(out.max()) == pytest.approx(3.0, abs=float(scale))


def test_cpu_fake_quant_torch_fallback():
    fake_quant = backend.make_qconfig("static", "fbgemm").activation()
    x = torch.randn(8, 16, dtype=torch.float64)
    assert fake_quant(x).dtype == torch.float64
    # Embedding rows use float zero points: the result equals the stock module's.
    constructor = backend.make_qconfig("weight_only", "fbgemm").weight
    ours, stock = constructor(), stock_fake_quant(constructor)
    table = torch.randn(50, 12, generator=torch.Generator().manual_seed(1))
    assert ours.zero_point.is_floating_point()
    assert torch.equal(ours(table), stock(table))
    assert torch.equal(ours.scale, stock.scale)
    assert ours.scale.shape == (50,)


def test_cpu_weight_fake_quant_trains_with_conversion_scale():
    # Conversion reads the observer's qparams, so training must fake-quantize with exactly those.
    weight = torch.randn(64, 32, generator=torch.Generator().manual_seed(2))
    ours = backend.make_qconfig("static", "fbgemm").weight()
    ours(weight)
    scale, zero_point = ours.calculate_qparams()
    assert torch.equal(ours.scale, scale)
    assert torch.equal(ours.zero_point, zero_point)
    assert ours.scale.shape == (64,)
