"""Select the modules a recipe quantizes, fuse them and swap in fake-quant (QAT) modules.

Preparation is idempotent: modules already inside a :class:`~.backend.QuantBoundary` are left
as they are, so it can run again after ``configure_model`` built more layers.
"""

from __future__ import annotations

import collections
import fnmatch
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_dynq.quantization import backend
from lightning_dynq.quantization.recipe import QuantRecipe

log = logging.getLogger(__name__)

_SELECTABLE_TYPES: dict[str, type[nn.Module]] = {"Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d}


@dataclass
class Preparation:
    """Outcome of :func:`prepare_model`.

    Attributes:
        quantized: module name to qconfig kind (``"static"``, ``"dynamic"`` or ``"weight_only"``)
            for every module now inside a :class:`~.backend.QuantBoundary`.
        kept_float: module name to the reason it stays float, for every candidate left float.
        fused: groups of module names fused before preparation, the first name holding the fused module.
        module_types: module name to its float type name (such as ``Linear`` or ``ConvBnReLU2d``).
        linearized: names of transformers ``Conv1D`` layers replaced by an equivalent ``nn.Linear``.
    """

    quantized: dict[str, str] = field(default_factory=dict)
    kept_float: dict[str, str] = field(default_factory=dict)
    fused: list[list[str]] = field(default_factory=list)
    module_types: dict[str, str] = field(default_factory=dict)
    linearized: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Return a few lines that count prepared and float modules per type, with the reasons."""
        prepared = collections.Counter(self.module_types[name] for name in self.quantized)
        lines = [f"Prepared {len(self.quantized)} modules for quantization-aware training: {dict(prepared)}."]
        if self.linearized:
            lines.append(f"Replaced {len(self.linearized)} transformers Conv1D layers by equivalent nn.Linear layers.")
        if self.fused:
            lines.append(f"Fused {len(self.fused)} groups: {self.fused}.")
        reasons: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
        for name, reason in self.kept_float.items():
            reasons[(self.module_types[name], reason)].append(name)
        for (type_name, reason), names in sorted(reasons.items()):
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            lines.append(f"Kept {len(names)} {type_name} float ({reason}): {shown}.")
        return "\n".join(lines)


def prepare_model(
    model: nn.Module,
    recipe: QuantRecipe,
    plan: dict[str, str | None] | None = None,
    fuse_groups: list[list[str]] | None = None,
) -> Preparation:
    """Fuse and prepare ``model`` in place for quantization-aware training.

    Args:
        model: the float model; modules are swapped in place and keep their parameter objects.
        recipe: which modules to quantize and how.
        plan: module name to qconfig kind (None keeps the module float) that replaces the
            selection by the recipe, used to rebuild a saved model. Every name must exist.
        fuse_groups: fusion groups that replace the automatic search and ``recipe.fuse_groups``.

    Returns:
        What was prepared, fused and kept float. Patterns are not checked here; call
        :func:`check_patterns` once the model has all of its modules.

    Raises:
        ValueError: a fusion group or plan entry names a module that does not exist.
    """
    preparation = Preparation()
    groups = fuse_groups if fuse_groups is not None else _fusion_groups(model, recipe)
    backend.fuse(model, groups)
    preparation.fused = groups

    modules = dict(model.named_modules())
    if plan is not None:
        missing = [name for name in plan if name not in modules]
        if missing:
            raise ValueError(
                f"Modules {missing} of the saved quantization plan are not in the model: the float module "
                "does not have the architecture the artifact was trained with."
            )

    preparation.linearized = linearize_transposed_conv1d(model)

    tied = _tied_weights(model)
    for name, module in _candidates(model):
        preparation.module_types[name] = _type_name(module)
        if isinstance(module, backend.QuantBoundary):
            preparation.quantized[name] = module.kind
            continue
        if plan is not None:
            kind, reason = plan.get(name), "not in the saved plan"
        else:
            kind, reason = _choose_kind(name, module, recipe, tied)
        if kind is None:
            preparation.kept_float[name] = reason
            continue
        qconfig = backend.make_qconfig(kind, recipe.engine, recipe.static_qconfig())
        set_submodule(model, name, backend.wrap_for_qat(module, kind, qconfig))
        preparation.quantized[name] = kind

    log.debug("%s", preparation.summary())
    return preparation


def check_patterns(model: nn.Module, recipe: QuantRecipe, preparation: Preparation) -> None:
    """Raise ValueError for a recipe pattern that matches no module, or when nothing was prepared."""
    names = list(preparation.module_types)
    # Examples for the message: modules this recipe quantizes, spread over the model.
    quantized = list(preparation.quantized) or names
    examples = []
    for index in (0, len(quantized) // 2, len(quantized) - 1):
        if quantized and quantized[index] not in examples:
            examples.append(quantized[index])
    for field_name, patterns in (
        ("overrides", list(recipe.overrides)),
        ("exclude", recipe.exclude),
        ("include", recipe.include or []),
    ):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                raise ValueError(
                    f"Pattern {pattern!r} in {field_name} matches no quantizable module. Module names look like "
                    f"{examples}; fix the pattern or remove it."
                )
    if not preparation.quantized:
        raise ValueError(
            f"No module of {type(model).__name__} matched the recipe (module_types={recipe.module_types}, "
            f"include={recipe.include}, exclude={recipe.exclude}, mode={recipe.mode!r}). Kept float: "
            f"{preparation.kept_float}. Widen module_types or include, or remove an exclude pattern."
        )


def boundaries(model: nn.Module) -> dict[str, backend.QuantBoundary]:
    """Return the quantized modules of ``model`` by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, backend.QuantBoundary)}


def linearize_transposed_conv1d(model: nn.Module) -> list[str]:
    """Replace every transformers ``Conv1D`` in ``model`` by an equivalent ``nn.Linear``, in place.

    GPT-2 style models use ``transformers.pytorch_utils.Conv1D``: a linear layer whose weight is
    stored as (in_features, out_features). The eager quantization path has kernels for
    ``nn.Linear`` only, so the layer becomes an ``nn.Linear`` with the transposed weight and the
    same bias, which computes the same function. The module is recognised by its class name and
    attributes so that this package does not import transformers.

    Returns:
        The names of the replaced modules.
    """
    replaced = []
    for name, module in list(model.named_modules()):
        if type(module).__name__ != "Conv1D" or not hasattr(module, "nf") or module.weight.ndim != 2:
            continue
        in_features, out_features = module.weight.shape
        linear = nn.Linear(in_features, out_features, bias=module.bias is not None)
        linear = linear.to(device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(module.weight.t())
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        linear.train(module.training)
        set_submodule(model, name, linear)
        replaced.append(name)
    return replaced


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Return modules that could be quantized, skipping everything inside a boundary."""
    found = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, backend.QuantBoundary) or backend.fused_base_type(module):
            # The children of a boundary or of a fused module are part of it.
            inside.append(name)
            found.append((name, module))
        elif type(module) in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding):
            found.append((name, module))
    return found


def _choose_kind(
    name: str, module: nn.Module, recipe: QuantRecipe, tied: dict[str, str]
) -> tuple[str | None, str]:
    """Return the qconfig kind for one module, or None with the reason it stays float."""
    base_type = backend.fused_base_type(module) or type(module)
    is_embedding = base_type is nn.Embedding

    if name in tied:
        return None, f"weight tied to {tied[name]}; the tie is kept"

    for pattern, kind in recipe.overrides.items():
        if fnmatch.fnmatchcase(name, pattern):
            if kind is None:
                return None, f"override {pattern!r}"
            if is_embedding:
                return "weight_only", f"override {pattern!r}"
            if kind == "dynamic" and type(module) is not nn.Linear:
                return None, "dynamic quantization has kernels for unfused Linear only"
            return kind, f"override {pattern!r}"

    if is_embedding:
        if recipe.quantize_embeddings:
            return "weight_only", ""
        return None, "embeddings stay float unless quantize_embeddings=True"
    if not any(base_type is _SELECTABLE_TYPES[t] for t in recipe.module_types):
        return None, f"type not in module_types={recipe.module_types}"
    for pattern in recipe.exclude:
        if fnmatch.fnmatchcase(name, pattern):
            return None, f"exclude {pattern!r}"
    if recipe.include is not None and not any(fnmatch.fnmatchcase(name, p) for p in recipe.include):
        return None, "no include pattern matches"
    if recipe.mode == "dynamic" and type(module) is not nn.Linear:
        return None, "dynamic quantization has kernels for unfused Linear only"
    return recipe.mode, ""


def _tied_weights(model: nn.Module) -> dict[str, str]:
    """Map each module whose weight is shared with another module to that module's name."""
    owners: dict[int, list[str]] = collections.defaultdict(list)
    for name, module in model.named_modules():
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if weight is not None:
            owners[id(weight)].append(name)
    tied = {}
    for names in owners.values():
        for name in names if len(names) > 1 else []:
            tied[name] = ", ".join(other for other in names if other != name)
    return tied


def _fusion_groups(model: nn.Module, recipe: QuantRecipe) -> list[list[str]]:
    modules = dict(model.named_modules())
    groups = []
    for group in recipe.fuse_groups:
        unknown = [name for name in group if name not in modules]
        if unknown:
            raise ValueError(
                f"Invalid fuse_groups entry {group}: modules {unknown} not found. Names are qualified, "
                f"such as {[n for n in modules if n][:3]}."
            )
        if backend.fused_base_type(modules[group[0]]) is None and not _inside_boundary(model, group[0]):
            groups.append(group)
    # Dynamic quantization has no fused kernels, so only static mode fuses automatically.
    if recipe.fuse and recipe.mode == "static":
        for name, module in modules.items():
            if isinstance(module, nn.Sequential) and not _inside_boundary(model, name):
                groups.extend(_sequential_groups(name, module))
    return groups


def _sequential_groups(prefix: str, sequential: nn.Sequential) -> list[list[str]]:
    children = list(sequential.named_children())
    groups = []
    index = 0
    while index < len(children):
        for pattern in backend.FUSION_PATTERNS:
            window = children[index : index + len(pattern)]
            if len(window) == len(pattern) and all(type(m) is t for (_, m), t in zip(window, pattern)):
                groups.append([f"{prefix}.{n}" if prefix else n for n, _ in window])
                index += len(pattern)
                break
        else:
            index += 1
    return groups


def _inside_boundary(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    for depth in range(len(parts)):
        prefix = ".".join(parts[:depth])
        module = model.get_submodule(prefix) if prefix else model
        if isinstance(module, backend.QuantBoundary):
            return True
    return False


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the qualified ``name`` inside ``model``, replacing what is there."""
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, module)


def _type_name(module: nn.Module) -> str:
    if isinstance(module, backend.QuantBoundary):
        # A QAT module keeps its float type's class name (torch.ao.nn.qat.Linear is "Linear").
        return type(module.module).__name__
    return type(module).__name__
