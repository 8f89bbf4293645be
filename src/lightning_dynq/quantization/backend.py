"""Eager-mode backend on ``torch.ao.quantization``: the only module that imports it.

Every call into ``torch.ao.quantization`` and ``torch.ao.nn`` goes through the functions here,
so that another backend (for example torchao) can replace this file without touching the
selection, scheduling or Lightning code. ``torch.ao.quantization`` emits a DeprecationWarning on
most calls since torch 2.9; the warnings are silenced inside these functions only.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lightning_dynq.quantization import padding

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import torch.ao.nn.intrinsic as nni
    import torch.ao.nn.intrinsic.qat as nniqat
    import torch.ao.nn.qat as nnqat
    import torch.ao.nn.qat.dynamic as nnqatd
    import torch.ao.nn.quantized as nnq
    import torch.ao.nn.quantized.dynamic as nnqd
    import torch.ao.quantization as tq
    from torch.ao.quantization.quantization_mappings import (
        get_default_qat_module_mappings,
        get_default_static_quant_module_mappings,
    )

# Engines whose default QAT qconfig torch.ao.quantization.get_default_qat_qconfig accepts (torch 2.13).
QCONFIG_ENGINES = ("fbgemm", "x86", "qnnpack", "onednn")

# Qconfig kinds a module can be given. "static" quantizes weights and activations ahead of time,
# "dynamic" quantizes weights ahead of time and activations per batch at run time, and
# "weight_only" is for embeddings: a per-row weight with float scale and zero point.
QCONFIG_KINDS = ("static", "dynamic", "weight_only")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        # Converting an artifact skeleton in load_quantized reads observers that never ran.
        warnings.filterwarnings("ignore", message="must run observer before calling calculate_qparams")
        yield


def supported_engines() -> list[str]:
    """Return the quantized engines of the installed torch build, without the "none" entry."""
    return [engine for engine in torch.backends.quantized.supported_engines if engine != "none"]


@contextlib.contextmanager
def quantized_engine(engine: str) -> Iterator[None]:
    """Set ``torch.backends.quantized.engine`` for the block, then restore the previous one."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def is_qconfig(value: Any) -> bool:
    """Return True when ``value`` is a ``torch.ao.quantization.QConfig``."""
    return isinstance(value, tq.QConfig)


def make_qconfig(kind: str, engine: str, static_qconfig: Any = None) -> Any:
    """Build the QConfig for one module.

    Args:
        kind: one of :data:`QCONFIG_KINDS`.
        engine: engine whose default static QAT qconfig is used for ``kind="static"``.
        static_qconfig: a ``QConfig`` that replaces the engine default for ``kind="static"``.
    """
    with _quiet():
        if kind == "static":
            if static_qconfig is not None:
                return static_qconfig
            return _on_cpu_kernels(tq.get_default_qat_qconfig(engine))
        if kind == "dynamic":
            return _dynamic_qat_qconfig(engine)
        if kind == "weight_only":
            return _on_cpu_kernels(tq.default_embedding_qat_qconfig)
    raise ValueError(f"Invalid qconfig kind {kind!r}: expected one of {list(QCONFIG_KINDS)}.")


def _dynamic_qat_qconfig(engine: str) -> Any:
    """Build the dynamic-mode QAT qconfig that simulates what the engine's dynamic Linear computes.

    At run time, the dynamic int8 Linear quantizes each input tensor with its own min/max range.
    On fbgemm and x86 it uses ``reduce_range=True``, so only 7 of the 8 activation bits are used
    (range 0..127). ``torch.ao.quantization.default_dynamic_qat_qconfig`` simulates 0..255, which
    makes the int8 model noisier than the fake-quant model; this qconfig matches the kernel.
    Weights get one scale per output channel on fbgemm and x86, because their dynamic int8 Linear
    accepts that and their static default uses it too. Other engines get one scale per tensor.
    """
    quant_max = 127 if engine in ("fbgemm", "x86") else 255
    activation = tq.FakeQuantize.with_args(
        observer=tq.MovingAverageMinMaxObserver,
        quant_min=0,
        quant_max=quant_max,
        is_dynamic=True,
        dtype=torch.quint8,
        averaging_constant=1,
    )
    per_channel = engine in ("fbgemm", "x86")
    weight = tq.default_per_channel_weight_fake_quant if per_channel else tq.default_weight_fake_quant
    return _on_cpu_kernels(tq.QConfig(activation=activation, weight=weight))


# ----------------------------------------------------------------------------------------------
# Fake quantization with faster CPU kernels
#
# Measured with torch 2.13 on a 2-core x86 machine, the CPU fake-quantize kernels took about 4 ns
# per element. The fused per-channel op ran one select and one fill per channel, and ``aminmax``
# along one dimension was about 18x slower than ``amin`` plus ``amax``. The classes below compute
# the same values with whole-tensor operations, 3x to 4x faster per tensor on that machine.
# docs/benchmarks.md has the effect on whole training steps (``python -m benchmarks.train_step``).


class _FakeQuantizeAffine(torch.autograd.Function):
    """Affine fake quantization whose gradient passes only where the value is not clamped.

    ``scale`` and ``zero_point`` are already shaped to broadcast against ``x``. The values and the
    gradient mask equal those of ``torch.fake_quantize_per_tensor_affine`` and
    ``torch.fake_quantize_per_channel_affine``: round half to even of ``x / scale``, shift by the
    zero point, clamp to the integer range, and scale back.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int
    ) -> torch.Tensor:
        # The output and the saved mask are allocated before the temporary steps. Freeing the steps
        # then leaves no gap between tensors that autograd keeps, which limits heap growth.
        out = torch.empty_like(x)
        inside = torch.empty_like(x, dtype=torch.bool) if ctx.needs_input_grad[0] else None
        steps = torch.mul(x, torch.reciprocal(scale)).round_()
        if zero_point.numel() == 1:
            # With one integer zero point, clamping the unshifted steps to the shifted range saves a pass.
            shift = int(zero_point.item())
            low, high = quant_min - shift, quant_max - shift
        else:
            steps.add_(zero_point)
            low, high = quant_min, quant_max
        torch.clamp(steps, low, high, out=out)
        if inside is not None:
            torch.eq(out, steps, out=inside)
            ctx.save_for_backward(inside)
        del steps
        if zero_point.numel() != 1:
            out.sub_(zero_point)
        return out.mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad, 0.0), None, None, None, None


class CPUFakeQuantize(tq.FakeQuantize):
    """``FakeQuantize`` that runs its fake-quant step with whole-tensor operations on CPU.

    Observation and the stored scale and zero point are those of ``FakeQuantize``, so conversion,
    checkpoints and the DDP observer sync see no difference. Other devices, dtypes other than
    float32 and float zero points (embedding rows) use the torch kernels.

    NOTE: on a GPU this falls back to the unfused ``FakeQuantize`` kernels, not the fused op of the
    engine default. The GPU path has not been timed.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != torch.float32 or self.zero_point.is_floating_point():
            return super().forward(x)
        if bool(self.observer_enabled[0]):
            self.activation_post_process(x.detach())
            scale, zero_point = self.calculate_qparams()
            self.scale.resize_(scale.shape).copy_(scale)
            self.zero_point.resize_(zero_point.shape).copy_(zero_point)
        if not bool(self.fake_quant_enabled[0]):
            return x
        scale, zero_point = self.scale, self.zero_point
        if self.is_per_channel:
            shape = [1] * x.dim()
            shape[self.ch_axis] = -1
            scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
        return _FakeQuantizeAffine.apply(x, scale, zero_point, self.quant_min, self.quant_max)


class CPUPerChannelMinMaxObserver(tq.MovingAveragePerChannelMinMaxObserver):
    """``MovingAveragePerChannelMinMaxObserver`` that reduces each channel with ``amin`` and ``amax``.

    The running minimum and maximum are the same as the parent's, computed without ``aminmax``
    along one dimension, which is slow on CPU (see the section comment above).
    """

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        if x_orig.numel() == 0:
            return x_orig
        rows = x_orig.detach().to(self.min_val.dtype).transpose(0, self.ch_axis).flatten(1)
        low, high = rows.amin(dim=1), rows.amax(dim=1)
        if self.min_val.numel() and self.max_val.numel():
            low = self.min_val + self.averaging_constant * (low - self.min_val)
            high = self.max_val + self.averaging_constant * (high - self.max_val)
        self.min_val.resize_(low.shape).copy_(low)
        self.max_val.resize_(high.shape).copy_(high)
        return x_orig


def _on_cpu_kernels(qconfig: Any) -> Any:
    """Return ``qconfig`` with its ``FakeQuantize`` constructors moved to :class:`CPUFakeQuantize`.

    The constructor arguments (observer, integer range, dtype, scheme) stay as they are, and a
    per-channel moving-average observer becomes :class:`CPUPerChannelMinMaxObserver`. Constructors
    of any other class are kept unchanged.
    """
    activation = _fake_quant_on_cpu_kernels(qconfig.activation)
    return tq.QConfig(activation=activation, weight=_fake_quant_on_cpu_kernels(qconfig.weight))


def _fake_quant_on_cpu_kernels(constructor: Any) -> Any:
    """Return one ``with_args`` constructor rebuilt on :class:`CPUFakeQuantize`, or unchanged."""
    partial = getattr(constructor, "p", None)
    if partial is None or partial.args or partial.func not in (tq.FakeQuantize, tq.FusedMovingAvgObsFakeQuantize):
        return constructor
    keywords = dict(partial.keywords)
    if keywords.get("observer") is tq.MovingAveragePerChannelMinMaxObserver:
        keywords["observer"] = CPUPerChannelMinMaxObserver
    return CPUFakeQuantize.with_args(**keywords)


def is_per_batch(fake_quant: Any) -> bool:
    """Return True for a dynamic-mode activation fake-quant, whose range comes from each batch."""
    return bool(getattr(fake_quant, "is_dynamic", False))


def describe_qconfig(qconfig: Any) -> dict[str, str]:
    """Return a JSON-ready description of a QConfig: its activation and weight constructors."""
    return {"activation": repr(qconfig.activation), "weight": repr(qconfig.weight)}


# ----------------------------------------------------------------------------------------------
# Fusion


# Module type sequences that fuse_modules_qat accepts, checked on consecutive Sequential children.
FUSION_PATTERNS: tuple[tuple[type[nn.Module], ...], ...] = (
    (nn.Conv1d, nn.BatchNorm1d, nn.ReLU),
    (nn.Conv2d, nn.BatchNorm2d, nn.ReLU),
    (nn.Conv1d, nn.BatchNorm1d),
    (nn.Conv2d, nn.BatchNorm2d),
    (nn.Conv1d, nn.ReLU),
    (nn.Conv2d, nn.ReLU),
    (nn.Linear, nn.BatchNorm1d),
    (nn.Linear, nn.ReLU),
)

# Fused float modules and the base type that decides whether they are selected.
FUSED_BASE_TYPES: dict[type[nn.Module], type[nn.Module]] = {
    nni.ConvBn1d: nn.Conv1d,
    nni.ConvBn2d: nn.Conv2d,
    nni.ConvBnReLU1d: nn.Conv1d,
    nni.ConvBnReLU2d: nn.Conv2d,
    nni.ConvReLU1d: nn.Conv1d,
    nni.ConvReLU2d: nn.Conv2d,
    nni.LinearReLU: nn.Linear,
    nni.LinearBn1d: nn.Linear,
}


def fuse(model: nn.Module, groups: list[list[str]]) -> None:
    """Fuse each group of module names in place with ``fuse_modules_qat``.

    The model must be in training mode, so that Conv-BN becomes a QAT ConvBn module that keeps
    updating its batch-norm statistics.
    """
    if not groups:
        return
    was_training = model.training
    model.train()
    with _quiet():
        tq.fuse_modules_qat(model, groups, inplace=True)
    model.train(was_training)


def fused_base_type(module: nn.Module) -> type[nn.Module] | None:
    """Return the base float type of a fused module, or None when it is not a fused module."""
    return FUSED_BASE_TYPES.get(type(module))


# ----------------------------------------------------------------------------------------------
# Boundaries: one quantized module with its own quantize / dequantize steps


class QuantBoundary(nn.Module):
    """A single quantized module with float tensors on both sides.

    In static mode the input goes through a ``QuantStub`` and the output through a ``DeQuantStub``,
    so the model around it (LayerNorm, softmax, residual adds) keeps running in float. In dynamic
    and weight-only modes the stubs are identities because the quantized module takes float input.
    """

    def __init__(self, module: nn.Module, kind: str) -> None:
        super().__init__()
        self.kind = kind
        static = kind == "static"
        self.quant = tq.QuantStub() if static else nn.Identity()
        self.module = module
        self.dequant = tq.DeQuantStub() if static else nn.Identity()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.dequant(self.module(self.quant(x), *args, **kwargs))

    @property
    def weight(self) -> Any:
        # Code that reads `layer.weight` (dtype or device checks in transformers) keeps working.
        return self.module.weight

    @property
    def bias(self) -> Any:
        return self.module.bias


def _qat_mapping(kind: str) -> dict[type[nn.Module], type[nn.Module]]:
    if kind == "dynamic":
        return {nn.Linear: nnqatd.Linear}
    if kind == "weight_only":
        # torch 2.13's default QAT mappings leave nn.Embedding out, so without this entry the
        # embedding would train in float and only be quantized at convert.
        return {nn.Embedding: nnqat.Embedding}
    return get_default_qat_module_mappings()


def _convert_mapping(kind: str) -> dict[type[nn.Module], type[nn.Module]]:
    if kind == "dynamic":
        return {nnqatd.Linear: nnqd.Linear, nniqat.LinearReLU: nnqd.Linear}
    if kind == "weight_only":
        return {nnqat.Embedding: nnq.Embedding}
    return get_default_static_quant_module_mappings()


def wrap_for_qat(module: nn.Module, kind: str, qconfig: Any) -> QuantBoundary:
    """Wrap ``module`` in a :class:`QuantBoundary` and swap it for its QAT module in place.

    The QAT module reuses the float module's parameter objects, so an optimizer built afterwards
    trains exactly the parameters that the fake-quant forward uses.
    """
    boundary = QuantBoundary(module, kind)
    boundary.qconfig = qconfig
    was_training = module.training
    # prepare_qat accepts only modules in training mode, while Hugging Face models come out of
    # from_pretrained in eval mode; the original mode is restored afterwards.
    boundary.train()
    with _quiet():
        tq.prepare_qat(boundary, mapping=_qat_mapping(kind), inplace=True)
    boundary.train(was_training)
    # The dynamic int8 Linear computes its input range over the whole tensor, padding included,
    # so only static activation ranges skip padded positions.
    if kind != "dynamic":
        for fake_quant in activation_fake_quants(boundary):
            _install_padding_hooks(fake_quant)
    return boundary


def convert_boundary(boundary: QuantBoundary) -> QuantBoundary:
    """Convert a prepared boundary in place to its int8 modules and return it."""
    with _quiet():
        tq.convert(boundary, mapping=_convert_mapping(boundary.kind), inplace=True)
    return boundary


def is_converted(boundary: QuantBoundary) -> bool:
    """Return True when the boundary contains a converted (int8) module."""
    return not any(isinstance(m, tq.FakeQuantizeBase) for m in boundary.modules())


# ----------------------------------------------------------------------------------------------
# Fake-quant and observer state


def fake_quants(model: nn.Module) -> Iterator[tuple[str, Any]]:
    """Yield ``(name, module)`` for every fake-quant module in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, tq.FakeQuantizeBase):
            yield name, module


def activation_fake_quants(model: nn.Module) -> list[Any]:
    """Return the fake-quant modules that observe activations (all but ``weight_fake_quant``)."""
    return [m for name, m in fake_quants(model) if not name.endswith("weight_fake_quant")]


def observer_flags(model: nn.Module) -> dict[str, tuple[bool, bool]]:
    """Return ``{name: (observer_enabled, fake_quant_enabled)}`` for every fake-quant module."""
    return {
        name: (bool(m.observer_enabled[0]), bool(m.fake_quant_enabled[0])) for name, m in fake_quants(model)
    }


def set_observer_flags(model: nn.Module, flags: dict[str, tuple[bool, bool]]) -> None:
    """Restore flags returned by :func:`observer_flags`."""
    modules = dict(fake_quants(model))
    for name, (observer_on, fake_quant_on) in flags.items():
        if name in modules:
            modules[name].enable_observer(observer_on)
            modules[name].enable_fake_quant(fake_quant_on)


def enable_observers(model: nn.Module, enabled: bool) -> None:
    """Switch observer updates of every fake-quant module on or off.

    Dynamic-mode activation fake-quants stay on: the int8 model computes their range from every
    input at run time, so fake quantization must do the same in evaluation too.
    """
    for _, module in fake_quants(model):
        module.enable_observer(enabled or is_per_batch(module))


def enable_fake_quant(model: nn.Module, enabled: bool) -> None:
    """Switch fake quantization of every fake-quant module on or off."""
    for _, module in fake_quants(model):
        module.enable_fake_quant(enabled)


def freeze_bn_stats(model: nn.Module) -> None:
    """Freeze the batch-norm running statistics of fused QAT Conv-BN / Linear-BN modules.

    NOTE: a BatchNorm that was not fused keeps updating; fusion is what makes it freezable.
    """
    model.apply(nniqat.freeze_bn_stats)


def observed_range(fake_quant: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Return the observer's ``(min_val, max_val)``, or None for an observer without a range."""
    observer = getattr(fake_quant, "activation_post_process", None)
    if observer is None or not hasattr(observer, "min_val"):
        return None
    return observer.min_val, observer.max_val


def unobserved_fake_quants(model: nn.Module) -> list[str]:
    """Return the names of fake-quant modules whose observer never saw a tensor."""
    names = []
    for name, module in fake_quants(model):
        observed = observed_range(module)
        if observed is not None and torch.isinf(observed[0]).all():
            names.append(name)
    return names


def invalid_scales(model: nn.Module) -> list[str]:
    """Return the names of fake-quant modules whose computed scale is NaN, infinite or zero."""
    names = []
    for name, module in fake_quants(model):
        observed = observed_range(module)
        if observed is None or torch.isinf(observed[0]).all():
            continue
        with _quiet():
            scale, _ = module.calculate_qparams()
        scale = scale.float()
        if not torch.isfinite(scale).all() or (scale == 0).any():
            names.append(name)
    return names


def sync_observed_ranges(model: nn.Module) -> int:
    """All-reduce the observed ranges of ``model`` across ranks: MIN of ``min_val``, MAX of ``max_val``.

    Call it after each training step on every rank of an initialized ``torch.distributed`` group.
    Afterwards every rank has the same ranges, scales and zero points. For moving-average
    observers (the default QAT qconfigs) this equals averaging the global batch min/max, because all
    ranks start the step from the same running value ``r`` and ``r + c * (m - r)`` increases with the
    batch value ``m`` (``0 < c <= 1``), so MIN/MAX commute with the update. Fake quantization inside
    the step itself still used each rank's own update. Observers without ``min_val``/``max_val``
    (histogram observers) are left unsynchronized. Returns the number of synchronized fake-quant modules.
    """
    import torch.distributed as dist

    observed = [
        (module, module.activation_post_process)
        for _, module in fake_quants(model)
        if bool(module.observer_enabled[0]) and observed_range(module) is not None
    ]
    if not observed:
        return 0
    minimums = torch.cat([observer.min_val.reshape(-1) for _, observer in observed])
    maximums = torch.cat([observer.max_val.reshape(-1) for _, observer in observed])
    dist.all_reduce(minimums, op=dist.ReduceOp.MIN)
    dist.all_reduce(maximums, op=dist.ReduceOp.MAX)

    offset = 0
    for fake_quant, observer in observed:
        count = observer.min_val.numel()
        observer.min_val.copy_(minimums[offset : offset + count].view_as(observer.min_val))
        observer.max_val.copy_(maximums[offset : offset + count].view_as(observer.max_val))
        offset += count
        if torch.isinf(observer.min_val).any():
            continue  # no rank has seen a tensor yet, so there is no scale to compute
        with _quiet():
            scale, zero_point = fake_quant.calculate_qparams()
        fake_quant.scale.resize_(scale.shape).copy_(scale)
        fake_quant.zero_point.resize_(zero_point.shape).copy_(zero_point)
    return len(observed)


def quant_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return copies of the fake-quant state: scales, zero points, observed ranges and flags, by state_dict key."""
    return {key: value.detach().clone() for key, value in model.state_dict().items() if is_quant_state_key(key)}


def is_quant_state_key(key: str) -> bool:
    """Return True for state_dict keys of fake-quant and observer modules."""
    parts = key.split(".")
    return "activation_post_process" in parts or "weight_fake_quant" in parts


# ----------------------------------------------------------------------------------------------
# Padding-aware observation


def _install_padding_hooks(fake_quant: Any) -> None:
    """Make an activation fake-quant observe only real tokens while a padding mask is active.

    With an active mask of shape (B, T) and an activation of shape (B, T, ...), the pre-hook runs
    the observer once on ``x[mask]`` with fake quantization off, then turns the observer off for the
    ordinary call, and the forward hook turns it back on. Other shapes observe everything.
    """
    state = {"inner_call": False, "reenable": False}

    def pre_hook(module: Any, args: tuple[Any, ...]) -> None:
        mask = padding.active_mask()
        if mask is None or state["inner_call"] or not bool(module.observer_enabled[0]):
            return
        x = args[0]
        if not isinstance(x, torch.Tensor) or x.dim() < 3 or tuple(x.shape[:2]) != tuple(mask.shape):
            return
        fake_quant_on = bool(module.fake_quant_enabled[0])
        state["inner_call"] = True
        try:
            module.enable_fake_quant(False)
            # Observation needs no gradient, so autograd records nothing for this extra pass.
            with torch.no_grad():
                module(x.flatten(0, 1).index_select(0, padding.active_positions().to(x.device)))
        finally:
            module.enable_fake_quant(fake_quant_on)
            state["inner_call"] = False
        module.enable_observer(False)
        state["reenable"] = True

    def post_hook(module: Any, args: tuple[Any, ...], output: Any) -> None:
        if state["reenable"] and not state["inner_call"]:
            module.enable_observer(True)
            state["reenable"] = False

    fake_quant.register_forward_pre_hook(pre_hook)
    fake_quant.register_forward_hook(post_hook)


# ----------------------------------------------------------------------------------------------
# Names for metadata


def quantized_type_name(module: nn.Module) -> str:
    """Return the qualified type name of a module, such as ``torch.ao.nn.quantized...Linear``."""
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"

