"""Quantization recipe: which modules to quantize, how, and when fake quantization starts.

The recipe only stores and validates settings, and :mod:`.prepare` and :mod:`.convert` apply it.
Every field is a plain type (str, int, bool, list, dict) so it can be set from LightningCLI YAML,
except that ``qconfig`` also accepts a ``torch.ao.quantization.QConfig`` object in Python.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from lightning_dynq.quantization import backend

MODES = ("static", "dynamic")

# Module type names a recipe can select, mapped to the attribute of torch.nn that defines them.
MODULE_TYPE_NAMES = ("Linear", "Conv1d", "Conv2d")

_MOMENT_PATTERN = re.compile(r"^\s*(\d+)\s*(steps?|epochs?)\s*$")


@dataclass(frozen=True)
class ScheduleMoment:
    """A point in training, counted in optimizer steps or in epochs."""

    count: int
    unit: str  # "steps" or "epochs"

    @classmethod
    def parse(cls, value: int | str, field_name: str) -> ScheduleMoment:
        """Parse an int (optimizer steps) or a string such as ``"500 steps"`` or ``"2 epochs"``."""
        if isinstance(value, bool):
            raise TypeError(f"Invalid {field_name}={value!r}: expected an int of steps or a string like '2 epochs'.")
        if isinstance(value, int):
            if value < 0:
                raise ValueError(f"Invalid {field_name}={value}: the step count must be 0 or more.")
            return cls(value, "steps")
        if isinstance(value, str):
            match = _MOMENT_PATTERN.match(value)
            if match is None:
                raise ValueError(
                    f"Invalid {field_name}={value!r}: expected an int of steps or a string like "
                    "'500 steps' or '2 epochs'."
                )
            unit = "steps" if match.group(2).startswith("step") else "epochs"
            return cls(int(match.group(1)), unit)
        raise TypeError(f"Invalid {field_name}={value!r}: expected an int of steps or a string like '2 epochs'.")

    def reached(self, global_step: int, epoch: int) -> bool:
        """Return True once training is at or past this moment."""
        position = global_step if self.unit == "steps" else epoch
        return position >= self.count

    def __str__(self) -> str:
        return f"{self.count} {self.unit}"


@dataclass
class QuantRecipe:
    """Settings for quantization-aware training and int8 conversion.

    Args:
        qconfig: an engine name (``"fbgemm"``, ``"x86"``, ``"qnnpack"``, ``"onednn"``) whose default
            QAT qconfig is used for static quantization, or a ``torch.ao.quantization.QConfig``.
            Default ``"fbgemm"``.
        engine: quantized engine used for training, conversion and inference. Default: the engine
            named by ``qconfig``, or ``"fbgemm"`` when ``qconfig`` is a QConfig object. It must be in
            ``torch.backends.quantized.supported_engines``.
        mode: ``"static"`` (weights and activations quantized ahead of time) or ``"dynamic"``
            (weights fake-quantized in training, activations quantized per batch at run time; only
            Linear layers, other layers stay float).
        module_types: leaf module types to quantize, from ``"Linear"``, ``"Conv1d"``, ``"Conv2d"``.
            Only exact types match, so subclasses such as the ``out_proj`` of
            ``nn.MultiheadAttention`` stay float.
        include: module name patterns (``fnmatch`` syntax, matched against names such as
            ``bert.encoder.layer.0.output.dense``) to quantize. None means every module of a selected type.
        exclude: module name patterns to keep float. Each pattern must match at least one module.
        overrides: name pattern to qconfig kind (``"static"``, ``"dynamic"``) or None to keep the
            module float. Overrides win over ``include``, ``exclude`` and ``module_types``, and each
            pattern must match at least one module.
        quantize_embeddings: quantize ``nn.Embedding`` weights (weight-only, per-row float scale and
            zero point). Default False: embeddings stay float.
        fuse: find Conv-BN(-ReLU), Conv-ReLU, Linear-BN and Linear-ReLU among consecutive children
            of each ``nn.Sequential`` and fuse them before preparation. Default True.
        fuse_groups: extra groups of module names to fuse, such as ``[["conv", "bn", "relu"]]``.
        fake_quant_start: when fake quantization starts: an int of optimizer steps or a string such
            as ``"2 epochs"``. Observers collect ranges from the start. Default 0.
        freeze_observers_at: when observers stop updating the quantization ranges. None: never.
        freeze_bn_stats_at: when fused batch-norm layers stop updating their running statistics.
            None: never.
        mask_key: key of the padding mask in dict batches. Activation observers then ignore padded
            positions. None turns this off. Default ``"attention_mask"``.

    Raises:
        ValueError: an invalid value, named in the message together with the allowed values.
        TypeError: a value of the wrong type.

    Example::

        >>> recipe = QuantRecipe(qconfig="x86", exclude=["classifier"], freeze_observers_at="2 epochs")
        >>> recipe.engine
        'x86'
    """

    qconfig: Any = "fbgemm"
    engine: str | None = None
    mode: str = "static"
    module_types: list[str] = field(default_factory=lambda: list(MODULE_TYPE_NAMES))
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    overrides: dict[str, str | None] = field(default_factory=dict)
    quantize_embeddings: bool = False
    fuse: bool = True
    fuse_groups: list[list[str]] = field(default_factory=list)
    fake_quant_start: int | str = 0
    freeze_observers_at: int | str | None = None
    freeze_bn_stats_at: int | str | None = None
    mask_key: str | None = "attention_mask"

    def __post_init__(self) -> None:
        self._validate_qconfig_and_engine()
        if self.mode not in MODES:
            raise ValueError(f"Invalid mode={self.mode!r}: expected one of {list(MODES)}.")
        self.module_types = list(self.module_types)
        for name in self.module_types:
            if name not in MODULE_TYPE_NAMES:
                raise ValueError(
                    f"Invalid module type {name!r} in module_types: expected names from {list(MODULE_TYPE_NAMES)}. "
                    "Embeddings are selected with quantize_embeddings=True."
                )
        self.include = None if self.include is None else _string_list(self.include, "include")
        self.exclude = _string_list(self.exclude, "exclude")
        if not isinstance(self.overrides, dict):
            raise TypeError(f"Invalid overrides={self.overrides!r}: expected a dict of name pattern to qconfig kind.")
        for pattern, kind in self.overrides.items():
            if kind is not None and kind not in MODES:
                raise ValueError(
                    f"Invalid overrides entry {pattern!r}: {kind!r}: expected one of {list(MODES)}, or None to keep float."
                )
        self.fuse_groups = [_string_list(group, "fuse_groups entry") for group in self.fuse_groups]
        for group in self.fuse_groups:
            if len(group) < 2:
                raise ValueError(f"Invalid fuse_groups entry {group!r}: a group names two or three modules.")
        for name in ("fake_quant_start", "freeze_observers_at", "freeze_bn_stats_at"):
            value = getattr(self, name)
            if value is not None:
                ScheduleMoment.parse(value, name)
        if self.fake_quant_start is None:
            raise ValueError("Invalid fake_quant_start=None: use 0 to start fake quantization at once.")
        if self.mask_key is not None and not isinstance(self.mask_key, str):
            raise TypeError(f"Invalid mask_key={self.mask_key!r}: expected a string key or None.")

    def _validate_qconfig_and_engine(self) -> None:
        supported = backend.supported_engines()
        if isinstance(self.qconfig, str):
            if self.qconfig not in backend.QCONFIG_ENGINES:
                raise ValueError(
                    f"Invalid qconfig={self.qconfig!r}: expected an engine name from {list(backend.QCONFIG_ENGINES)} "
                    "or a torch.ao.quantization.QConfig."
                )
            if self.engine is not None and self.engine != self.qconfig:
                raise ValueError(
                    f"Invalid engine={self.engine!r} with qconfig={self.qconfig!r}: training and conversion must use "
                    "the same engine, so leave engine unset or set it to the qconfig's engine."
                )
            self.engine = self.qconfig
        elif backend.is_qconfig(self.qconfig):
            self.engine = self.engine or "fbgemm"
        else:
            raise TypeError(
                f"Invalid qconfig={self.qconfig!r}: expected an engine name string or a torch.ao.quantization.QConfig."
            )
        if self.engine not in supported:
            raise ValueError(
                f"Engine {self.engine!r} is not supported by this torch build: supported engines are {supported}."
            )

    @property
    def schedule(self) -> dict[str, ScheduleMoment | None]:
        """Parsed schedule moments by field name."""
        return {
            name: None if getattr(self, name) is None else ScheduleMoment.parse(getattr(self, name), name)
            for name in ("fake_quant_start", "freeze_observers_at", "freeze_bn_stats_at")
        }

    def static_qconfig(self) -> Any:
        """Return the QConfig object given in ``qconfig``, or None when it names an engine."""
        return None if isinstance(self.qconfig, str) else self.qconfig

    def to_dict(self) -> dict[str, Any]:
        """Return the recipe as JSON-ready data. A QConfig object is stored as its description."""
        data = dataclasses.asdict(self) if isinstance(self.qconfig, str) else {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self)
        }
        if not isinstance(self.qconfig, str):
            data["qconfig"] = {"custom": backend.describe_qconfig(self.qconfig)}
        return data


def _string_list(value: Any, field_name: str) -> list[str]:
    if isinstance(value, str) or not all(isinstance(item, str) for item in value):
        raise TypeError(f"Invalid {field_name}={value!r}: expected a list of strings.")
    return list(value)
