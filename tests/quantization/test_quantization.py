"""Recipe validation, preparation, padding-aware observers, conversion and loading, without Lightning."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from lightning_dynq.quantization import (
    QuantRecipe,
    ScheduleMoment,
    backend,
    boundaries,
    check_patterns,
    check_ready_to_convert,
    convert_copy,
    padding_mask,
    prepare_model,
    quantized_modules,
)


def small_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


class TokenModel(nn.Module):
    """Embedding, two Linear layers and an output layer tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 20, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(ids)
        hidden = self.norm(hidden + torch.relu(self.proj(hidden)))
        return self.lm_head(hidden)


# ----------------------------------------------------------------------------------------------
# Recipe


def test_recipe_rejects_unknown_qconfig():
    with pytest.raises(ValueError, match="'fbgemmm'"):
        QuantRecipe(qconfig="fbgemmm")


def test_recipe_rejects_unsupported_engine_listing_supported():
    qconfig = backend.make_qconfig("static", "fbgemm")
    with pytest.raises(ValueError, match=r"'mkl' is not supported.*supported engines are \["):
        QuantRecipe(qconfig=qconfig, engine="mkl")


def test_recipe_rejects_engine_disagreeing_with_qconfig():
    with pytest.raises(ValueError, match="same engine"):
        QuantRecipe(qconfig="fbgemm", engine="qnnpack")


@pytest.mark.parametrize(
    ("field", "value", "error", "message"),
    [
        ("mode", "float16", ValueError, "mode='float16'"),
        ("module_types", ["Embedding"], ValueError, "module type 'Embedding'"),
        ("overrides", {"fc": "int4"}, ValueError, "overrides entry 'fc'"),
        ("fake_quant_start", "2 weeks", ValueError, "fake_quant_start='2 weeks'"),
        ("freeze_observers_at", -1, ValueError, "freeze_observers_at=-1"),
        ("freeze_bn_stats_at", True, TypeError, "freeze_bn_stats_at=True"),
        ("exclude", "classifier", TypeError, "exclude='classifier'"),
        ("fuse_groups", [["conv"]], ValueError, r"fuse_groups entry \['conv'\]"),
    ],
)
def test_recipe_rejects_invalid_field(field, value, error, message):
    with pytest.raises(error, match=message):
        QuantRecipe(**{field: value})


def test_schedule_moment_parses_steps_and_epochs():
    assert ScheduleMoment.parse(500, "x") == ScheduleMoment(500, "steps")
    assert ScheduleMoment.parse("2 epochs", "x") == ScheduleMoment(2, "epochs")
    assert ScheduleMoment.parse("1 step", "x") == ScheduleMoment(1, "steps")
    assert ScheduleMoment(2, "epochs").reached(global_step=100, epoch=1) is False
    assert ScheduleMoment(2, "epochs").reached(global_step=0, epoch=2) is True


def test_recipe_to_dict_is_json_ready():
    recipe = QuantRecipe(qconfig="x86", exclude=["head"], freeze_observers_at="1 epochs")
    data = json.loads(json.dumps(recipe.to_dict()))
    assert data["engine"] == "x86"
    assert QuantRecipe(**data) == recipe


# ----------------------------------------------------------------------------------------------
# Preparation


def test_prepare_keeps_parameter_objects():
    model = small_mlp()
    weights = [model[0].weight, model[2].weight]
    prepare_model(model, QuantRecipe(fuse=False))
    assert model[0].module.weight is weights[0]
    assert model[2].module.weight is weights[1]
    assert {id(p) for p in model.parameters()} == {id(p) for p in model.modules() for p in p._parameters.values()}


def test_prepare_is_idempotent():
    model = small_mlp()
    first = prepare_model(model, QuantRecipe())
    state_keys = list(model.state_dict())
    second = prepare_model(model, QuantRecipe())
    assert first.quantized == second.quantized == {"0": "static", "2": "static"}
    assert list(model.state_dict()) == state_keys


def test_prepare_fuses_linear_relu_and_conv_bn_relu():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.ReLU())
    preparation = prepare_model(model, QuantRecipe())
    assert preparation.fused == [["0", "1", "2"], ["4", "5"]]
    assert preparation.module_types == {"0": "ConvBnReLU2d", "4": "LinearReLU"}
    model.train()
    model(torch.randn(2, 3, 8, 8))
    quantized = convert_copy(model, "fbgemm")
    assert quantized_modules(quantized) == {
        "0": "torch.ao.nn.intrinsic.quantized.modules.conv_relu.ConvReLU2d",
        "4": "torch.ao.nn.intrinsic.quantized.modules.linear_relu.LinearReLU",
    }


def test_prepare_rejects_unknown_fuse_group_name():
    with pytest.raises(ValueError, match=r"modules \['conv9'\] not found"):
        prepare_model(small_mlp(), QuantRecipe(fuse_groups=[["0", "conv9"]]))


def test_check_patterns_names_unmatched_pattern():
    model = small_mlp()
    recipe = QuantRecipe(exclude=["classifier"])
    preparation = prepare_model(model, recipe)
    with pytest.raises(ValueError, match="'classifier' in exclude matches no quantizable module"):
        check_patterns(model, recipe, preparation)


def test_unmatched_pattern_hint_lists_quantized_modules():
    model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 3))
    recipe = QuantRecipe(exclude=["head"], fuse=False)
    preparation = prepare_model(model, recipe)
    # The float embedding is not a useful example, so the hint names the quantized Linears.
    with pytest.raises(ValueError, match=r"look like \['1', '3', '4'\]; fix the pattern"):
        check_patterns(model, recipe, preparation)


def test_check_patterns_rejects_empty_selection():
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))
    recipe = QuantRecipe()
    preparation = prepare_model(model, recipe)
    with pytest.raises(ValueError, match="No module of Sequential matched the recipe"):
        check_patterns(model, recipe, preparation)


def test_overrides_win_over_mode_and_exclude():
    model = small_mlp()
    preparation = prepare_model(model, QuantRecipe(fuse=False, overrides={"0": "dynamic", "2": None}))
    assert preparation.quantized == {"0": "dynamic"}
    assert preparation.kept_float == {"2": "override '2'"}
    assert isinstance(model[2], nn.Linear)


def test_embedding_float_by_default_and_tied_head_kept():
    model = TokenModel()
    preparation = prepare_model(model, QuantRecipe(quantize_embeddings=True))
    assert preparation.quantized == {"proj": "static"}
    assert preparation.kept_float["lm_head"] == "weight tied to embed; the tie is kept"
    assert "weight tied to lm_head" in preparation.kept_float["embed"]
    assert model.lm_head.weight is model.embed.weight
    model(torch.randint(0, 20, (2, 5)))
    quantized = convert_copy(model, "fbgemm")
    assert quantized.lm_head.weight is quantized.embed.weight


def test_embedding_weight_only_when_requested():
    model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 3))
    preparation = prepare_model(model, QuantRecipe(quantize_embeddings=True))
    assert preparation.quantized == {"0": "weight_only", "1": "static"}
    qconfig = model[0].module.qconfig
    assert qconfig.weight.p.keywords["qscheme"] == torch.per_channel_affine_float_qparams
    # The weight-only qconfig has no activation fake quantization.
    assert backend.activation_fake_quants(model[0]) == []
    tokens = torch.randint(0, 20, (2, 5))
    model(tokens)
    # Training uses the weight-only rounding: one float scale and zero point per row, 8 bits.
    fake_quant_rows = model[0].module(tokens)
    assert not torch.equal(fake_quant_rows, model[0].module.weight[tokens])
    quantized = convert_copy(model, "fbgemm")
    assert quantized_modules(quantized)["0"] == "torch.ao.nn.quantized.modules.embedding_ops.Embedding"
    # The int8 table returns exactly the rows that training saw.
    torch.testing.assert_close(quantized[0].module(tokens), fake_quant_rows, rtol=0, atol=1e-6)


def test_dynamic_mode_keeps_conv_float():
    model = nn.Sequential(nn.Conv1d(4, 4, 1), nn.Flatten(), nn.Linear(12, 2), nn.ReLU())
    preparation = prepare_model(model, QuantRecipe(mode="dynamic"))
    assert preparation.quantized == {"2": "dynamic"}
    assert preparation.kept_float == {"0": "dynamic quantization has kernels for unfused Linear only"}
    model(torch.randn(2, 4, 3))
    quantized = convert_copy(model, "fbgemm")
    assert quantized_modules(quantized) == {"2": "torch.ao.nn.quantized.dynamic.modules.linear.Linear"}
    assert type(quantized[0]) is nn.Conv1d


# ----------------------------------------------------------------------------------------------
# Padding-aware observers


def _activation_ranges(model: nn.Module) -> list[tuple[float, float]]:
    ranges = []
    for fake_quant in backend.activation_fake_quants(model):
        low, high = backend.observed_range(fake_quant)
        ranges.append((float(low), float(high)))
    return ranges


def test_padding_mask_hides_padded_values_from_observers():
    torch.manual_seed(0)
    unpadded_model = nn.Sequential(nn.Linear(6, 5))
    padded_model = nn.Sequential(nn.Linear(6, 5))
    padded_model.load_state_dict(unpadded_model.state_dict())
    prepare_model(unpadded_model, QuantRecipe())
    prepare_model(padded_model, QuantRecipe())

    real = torch.randn(2, 7, 6)
    mask = torch.tensor([[1] * 4 + [0] * 3, [1] * 3 + [0] * 4])
    # Reference batch: padding positions repeat the first token, so they cannot widen any range.
    reference = torch.where(mask.bool().unsqueeze(-1), real, real[:, :1].expand_as(real))
    padded = torch.where(mask.bool().unsqueeze(-1), real, torch.full_like(real, 1e4))
    padded[1, 5] = -1e4
    unpadded_model(reference)
    with padding_mask(mask):
        padded_model(padded)

    assert _activation_ranges(padded_model) == _activation_ranges(unpadded_model)
    assert all(abs(high) < 100 for _, high in _activation_ranges(padded_model))
    # Observers are enabled again after the masked step.
    assert all(flags[0] for flags in backend.observer_flags(padded_model).values())


def test_padding_mask_ignored_for_other_shapes():
    model = nn.Sequential(nn.Linear(6, 5))
    prepare_model(model, QuantRecipe())
    pooled = torch.randn(2, 6)
    pooled[0, 0] = 50.0
    with padding_mask(torch.tensor([[1, 0], [1, 1]])):
        model(pooled)
    low, high = backend.observed_range(backend.activation_fake_quants(model)[0])
    assert float(high) == 50.0


# ----------------------------------------------------------------------------------------------
# Conversion checks


def test_convert_names_module_that_never_ran():
    model = nn.ModuleDict({"used": nn.Linear(4, 4), "unused": nn.Linear(4, 4)})
    prepare_model(model, QuantRecipe())
    model["used"](torch.randn(2, 4))
    with pytest.raises(RuntimeError, match=r"\['unused'\] never ran during training"):
        check_ready_to_convert(model)


def test_convert_error_shortens_long_module_list():
    model = nn.ModuleDict({f"unused_{i:02d}": nn.Linear(4, 4) for i in range(12)})
    prepare_model(model, QuantRecipe())
    with pytest.raises(RuntimeError) as error:
        check_ready_to_convert(model)
    message = str(error.value)
    assert "'unused_09'] and 2 more (12 in all) never ran during training" in message
    assert "unused_10" not in message


def test_convert_names_module_with_invalid_scale():
    model = nn.ModuleDict({"good": nn.Linear(4, 4), "bad": nn.Linear(4, 4)})
    prepare_model(model, QuantRecipe())
    model["good"](torch.randn(2, 4))
    model["bad"](torch.randn(2, 4))
    observer = model["bad"].quant.activation_post_process.activation_post_process
    observer.min_val.fill_(0.0)
    observer.max_val.fill_(math.inf)
    with pytest.raises(RuntimeError, match=r"\['bad'\] have a NaN, infinite or zero scale"):
        check_ready_to_convert(model)


def test_int8_output_close_to_fake_quant():
    model = small_mlp()
    prepare_model(model, QuantRecipe())
    model.train()
    for _ in range(20):
        model(torch.randn(32, 8))
    model.eval()
    backend.enable_observers(model, False)
    quantized = convert_copy(model, "fbgemm")
    x = torch.randn(64, 8)
    with backend.quantized_engine("fbgemm"):
        int8_out = quantized(x)
    fake_out = model(x)
    difference = (int8_out - fake_out).abs()
    output_scale = quantized[2].module.scale
    # NOTE: with fbgemm a few outputs differ by several output steps from the fake-quant model
    # (qnnpack matches to one step); the cause is not known yet, so this bounds the fraction.
    assert (difference <= output_scale * 1.01).float().mean() >= 0.95
    assert difference.max() < 0.15
    assert len(boundaries(model)) == 2  # the QAT model is unchanged by conversion
