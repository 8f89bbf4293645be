"""Save and load int8 artifacts: ``model.pt``, ``metadata.json`` and ``report.json``."""

from __future__ import annotations

import copy
import importlib.metadata
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_dynq.quantization import backend
from lightning_dynq.quantization.convert import convert_copy
from lightning_dynq.quantization.prepare import boundaries, prepare_model
from lightning_dynq.quantization.recipe import QuantRecipe

MODEL_FILE = "model.pt"
METADATA_FILE = "metadata.json"
REPORT_FILE = "report.json"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json(path: Path, content: dict[str, Any]) -> None:
    """Write ``content`` as indented JSON, atomically."""
    write_atomic(path, (json.dumps(content, indent=2, sort_keys=True) + "\n").encode())


def serialized_size(state_dict: dict[str, Any]) -> int:
    """Return the number of bytes ``torch.save`` writes for ``state_dict``."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.getbuffer().nbytes


def float_state_dict(model: nn.Module) -> dict[str, Any]:
    """Return the state_dict of a QAT model without its fake-quant and observer entries."""
    return {k: v for k, v in model.state_dict().items() if not backend.is_quant_state_key(k)}


def save_model(directory: Path, quantized_model: nn.Module) -> Path:
    """Save the int8 model's state_dict as ``model.pt`` atomically and return its path."""
    buffer = io.BytesIO()
    torch.save(quantized_model.state_dict(), buffer)
    path = directory / MODEL_FILE
    write_atomic(path, buffer.getvalue())
    return path


def build_metadata(
    recipe: QuantRecipe,
    quantized_modules: dict[str, str],
    plan: dict[str, str],
    fused: list[list[str]],
    bucket_boundaries: Any = None,
) -> dict[str, Any]:
    """Return the content of ``metadata.json``.

    ``plan`` maps each quantized module name to its qconfig kind, and ``quantized_modules`` maps
    it to its int8 type. :func:`load_quantized` rebuilds the model from ``plan`` and ``fused``.
    """
    versions = {"torch": torch.__version__}
    for package in ("lightning", "transformers"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "format_version": 1,
        "engine": recipe.engine,
        "mode": recipe.mode,
        "qconfig": backend.describe_qconfig(
            backend.make_qconfig("static" if recipe.mode == "static" else "dynamic", recipe.engine, recipe.static_qconfig())
        ),
        "recipe": recipe.to_dict(),
        "quantized_modules": [
            {"name": name, "kind": plan[name], "type": type_name} for name, type_name in quantized_modules.items()
        ],
        "fused": fused,
        "versions": versions,
        "bucket_boundaries": _json_ready(bucket_boundaries),
    }


def load_quantized(path: str | os.PathLike[str], float_module: nn.Module, qconfig: Any = None) -> nn.Module:
    """Rebuild an int8 model from an artifact folder and an untrained float module of the same architecture.

    A copy of ``float_module`` is prepared with the saved plan and fusions, converted with the saved
    engine, and loaded with ``model.pt`` (``torch.load(weights_only=True)``). ``float_module`` is
    not changed. Run the result with ``torch.backends.quantized.engine`` set to ``metadata["engine"]``.

    Args:
        path: the artifact folder (holding ``model.pt`` and ``metadata.json``) or its ``model.pt``.
        float_module: the float model, for example the LightningModule built with the training arguments.
        qconfig: the ``QConfig`` object used in training, needed only when the recipe held one.

    Raises:
        FileNotFoundError: ``model.pt`` or ``metadata.json`` is missing.
        ValueError: the float module's architecture does not match the saved model.

    Example::

        model = load_quantized("lightning_logs/version_0/int8", MyModule())
    """
    directory = Path(path)
    if directory.name == MODEL_FILE:
        directory = directory.parent
    for name in (MODEL_FILE, METADATA_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(
                f"Missing {name} in {directory}: expected the folder written by DynamicQuantCallback "
                "(lightning_logs/version_N/int8 or its output_dir)."
            )
    metadata = json.loads((directory / METADATA_FILE).read_text())

    recipe_data = dict(metadata["recipe"])
    if isinstance(recipe_data["qconfig"], dict):
        if qconfig is None:
            raise ValueError(
                f"The artifact in {directory} was trained with a custom QConfig {recipe_data['qconfig']['custom']}; "
                "pass the same object as load_quantized(..., qconfig=...)."
            )
        recipe_data["qconfig"] = qconfig
    recipe = QuantRecipe(**recipe_data)
    plan = {entry["name"]: entry["kind"] for entry in metadata["quantized_modules"]}

    model = copy.deepcopy(float_module)
    try:
        prepare_model(model, recipe, plan=plan, fuse_groups=metadata["fused"])
    except (KeyError, AttributeError, AssertionError) as error:
        raise ValueError(
            f"Cannot prepare {type(float_module).__name__} with the plan saved in {directory}: {error}. "
            "The float module must have the architecture the artifact was trained with."
        ) from error
    quantized = convert_copy(model, recipe.engine, check=False)

    state_dict = torch.load(directory / MODEL_FILE, weights_only=True)
    with backend.quantized_engine(recipe.engine):
        try:
            quantized.load_state_dict(state_dict)
        except RuntimeError as error:
            raise ValueError(
                f"The weights in {directory / MODEL_FILE} do not fit {type(float_module).__name__}: "
                f"{str(error).splitlines()[0]} Build the float module with the arguments used in training."
            ) from error
    prepared_names = set(boundaries(quantized))
    if prepared_names != set(plan):
        raise ValueError(f"Quantized modules {sorted(set(plan) - prepared_names)} could not be rebuilt.")
    return quantized


def _json_ready(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.tolist()
    try:
        return [_json_ready(v) for v in value]
    except TypeError:
        return repr(value)
