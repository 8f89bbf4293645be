"""Save, load and export int8 artifacts: ``model.pt``, ``metadata.json``, ``report.json`` and TorchScript."""

from __future__ import annotations

import copy
import hashlib
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
        # mkstemp creates the file readable by its owner only. Give it the permissions that any
        # new file gets under the process umask, as report.md and report.png have.
        os.chmod(temporary, 0o666 & ~_current_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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


def model_bytes(quantized_model: nn.Module) -> bytes:
    """Return the bytes of ``torch.save(quantized_model.state_dict())``, the content of ``model.pt``."""
    buffer = io.BytesIO()
    torch.save(quantized_model.state_dict(), buffer)
    return buffer.getvalue()


def save_model(directory: Path, quantized_model: nn.Module | bytes) -> Path:
    """Save the int8 model's state_dict as ``model.pt`` atomically and return its path.

    ``metadata.json`` of an earlier artifact in ``directory`` is removed first, because it
    describes the old weights. Write the new one with :func:`write_metadata` afterwards.
    ``quantized_model`` may also be the bytes returned by :func:`model_bytes`.
    """
    data = quantized_model if isinstance(quantized_model, bytes) else model_bytes(quantized_model)
    (directory / METADATA_FILE).unlink(missing_ok=True)
    path = directory / MODEL_FILE
    write_atomic(path, data)
    return path


def write_metadata(directory: Path, metadata: dict[str, Any]) -> Path:
    """Write ``metadata.json`` with the SHA-256 and size of the ``model.pt`` already in ``directory``.

    Written last, ``metadata.json`` marks the artifact complete: each file is renamed into place
    whole, and :func:`load_quantized` checks that ``model.pt`` matches the checksum, so a crash
    between the two writes, or weights from another run, fail to load instead of loading silently.
    """
    model_path = directory / MODEL_FILE
    content = dict(metadata)
    content["model_sha256"] = hashlib.sha256(model_path.read_bytes()).hexdigest()
    content["model_size_bytes"] = model_path.stat().st_size
    path = directory / METADATA_FILE
    write_json(path, content)
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


def load_quantized(
    path: str | os.PathLike[str],
    float_module: nn.Module,
    qconfig: Any = None,
    engine: str | None = None,
    check_versions: bool = True,
) -> nn.Module:
    """Rebuild an int8 model from an artifact folder and an untrained float module of the same architecture.

    A copy of ``float_module`` is prepared with the saved plan and fusions, converted with the saved
    engine, and loaded with ``model.pt`` (``torch.load(weights_only=True)``). ``float_module`` is
    not changed. Run the result with ``torch.backends.quantized.engine`` set to ``metadata["engine"]``.

    Args:
        path: the artifact folder (holding ``model.pt`` and ``metadata.json``) or its ``model.pt``.
        float_module: the float model, for example the LightningModule built with the training arguments.
        qconfig: the ``QConfig`` object used in training, needed only when the recipe held one.
        engine: the quantized engine you will run the model with. Default: the saved engine. Packed
            int8 weights belong to one engine, so any other value raises ValueError.
        check_versions: raise ValueError when the artifact was written by another torch release.
            Set it to False to load anyway.

    Raises:
        FileNotFoundError: ``model.pt`` or ``metadata.json`` is missing.
        ValueError: the float module's architecture does not match the saved model, ``model.pt``
            does not match the checksum in ``metadata.json``, or the torch release or engine differ.

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
    _check_artifact(directory, metadata, engine, check_versions)

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
    # Quantized modules load packed weights without comparing shapes, so compare them here.
    mismatched = _shape_mismatches(quantized.state_dict(), state_dict)
    if mismatched:
        raise ValueError(
            f"The weights in {directory / MODEL_FILE} do not fit {type(float_module).__name__}: shapes differ for "
            f"{mismatched[:5]}. Build the float module with the arguments used in training."
        )
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


TORCHSCRIPT_FILE = "model.torchscript.pt"


class _KeywordForward(nn.Module):
    """Call ``model(**inputs)`` from positional tensors, because ``torch.jit.trace`` passes tensors by position."""

    def __init__(self, model: nn.Module, input_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.input_names = input_names

    def forward(self, *tensors: torch.Tensor) -> Any:
        return self.model(**dict(zip(self.input_names, tensors)))


def export_torchscript(
    quantized_model: nn.Module,
    example_inputs: dict[str, torch.Tensor],
    engine: str,
    check_inputs: list[dict[str, torch.Tensor]] = (),
    path: str | os.PathLike[str] | None = None,
    atol: float = 0.0,
) -> torch.jit.ScriptModule:
    """Trace the int8 model with ``torch.jit.trace`` and check it on other input shapes.

    The traced module takes the tensors of ``example_inputs`` by position, in the dict's key order,
    and must return a tensor or a tuple of tensors. Each entry of ``check_inputs`` (other batch
    sizes and sequence lengths) runs through the eager and the traced model, and their outputs must
    agree within ``atol``. Tracing records one path through the Python code, so models whose forward
    branches on tensor values, or returns dicts or dataclasses such as Hugging Face ``ModelOutput``,
    cannot be exported this way; the check then raises instead of saving a wrong module.

    Args:
        quantized_model: the converted int8 model, for example ``DynamicQuantCallback.quantized_model``.
        example_inputs: keyword arguments of one forward call, such as one batch without its labels.
        engine: the quantized engine the model was converted for.
        check_inputs: more keyword-argument dicts to compare eager and traced outputs on.
        path: where to save the traced module (atomically). None: do not save.
        atol: allowed absolute difference between eager and traced outputs. Default 0 (bit-equal).

    Raises:
        ValueError: tracing failed, or the traced module differs from the eager model on an input.
    """
    names = list(example_inputs)
    wrapper = _KeywordForward(quantized_model, names).eval()
    # The tracer reads every attribute of the module, and a LightningModule's ``trainer`` property
    # raises when no Trainer is attached unless Lightning's own scripting flag is set.
    lightning_flag = hasattr(quantized_model, "_jit_is_scripting")
    with backend.quantized_engine(engine), torch.no_grad():
        try:
            if lightning_flag:
                quantized_model._jit_is_scripting = True
            traced = torch.jit.trace(wrapper, tuple(example_inputs[n] for n in names), check_trace=False)
        except Exception as error:  # tracing raises many error types from inside the model code
            raise ValueError(
                f"TorchScript tracing of {type(quantized_model).__name__} failed: {error}. The forward must take "
                f"the tensors {names} and return a tensor or a tuple of tensors."
            ) from error
        finally:
            if lightning_flag:
                quantized_model._jit_is_scripting = False
        for inputs in [example_inputs, *check_inputs]:
            expected = quantized_model(**inputs)
            actual = traced(*(inputs[n] for n in names))
            _check_traced_output(expected, actual, inputs, atol)
    if path is not None:
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        write_atomic(Path(path), buffer.getvalue())
    return traced


def _check_traced_output(expected: Any, actual: Any, inputs: dict[str, torch.Tensor], atol: float) -> None:
    shapes = {name: tuple(value.shape) for name, value in inputs.items()}
    expected_list = list(expected) if isinstance(expected, (tuple, list)) else [expected]
    actual_list = list(actual) if isinstance(actual, (tuple, list)) else [actual]
    if len(expected_list) != len(actual_list) or not all(isinstance(t, torch.Tensor) for t in expected_list):
        raise ValueError(
            f"The traced module returns {type(actual).__name__}, the eager model {type(expected).__name__}, on inputs "
            f"{shapes}: the forward must return a tensor or a tuple of tensors to be exported."
        )
    for expected_tensor, actual_tensor in zip(expected_list, actual_list):
        if expected_tensor.shape != actual_tensor.shape or not torch.allclose(expected_tensor, actual_tensor, atol=atol, rtol=0):
            raise ValueError(
                f"The traced module differs from the eager int8 model on inputs {shapes}: the trace recorded "
                "shapes or branches of the example input. This model cannot be exported with torch.jit.trace."
            )


def _check_artifact(directory: Path, metadata: dict[str, Any], engine: str | None, check_versions: bool) -> None:
    """Raise ValueError when ``model.pt`` is not the file ``metadata.json`` describes, or cannot run here."""
    expected_sha256 = metadata.get("model_sha256")
    if expected_sha256 is not None:
        actual_sha256 = hashlib.sha256((directory / MODEL_FILE).read_bytes()).hexdigest()
        if actual_sha256 != expected_sha256:
            raise ValueError(
                f"{directory / MODEL_FILE} does not match the SHA-256 in {METADATA_FILE} ({expected_sha256[:12]}..., "
                f"file has {actual_sha256[:12]}...): the artifact is incomplete or mixes two runs. Export it again."
            )

    saved_engine = metadata["engine"]
    if engine is not None and engine != saved_engine:
        raise ValueError(
            f"The artifact in {directory} was converted for engine {saved_engine!r}, not {engine!r}: packed int8 "
            f"weights belong to one engine. Load it with engine={saved_engine!r} or train again with qconfig={engine!r}."
        )
    supported = backend.supported_engines()
    if saved_engine not in supported:
        raise ValueError(
            f"The artifact in {directory} needs the quantized engine {saved_engine!r}, which this torch build does not "
            f"support (supported: {supported}). Load it on a machine whose torch supports {saved_engine!r}."
        )

    saved_torch = (metadata.get("versions") or {}).get("torch")
    if check_versions and saved_torch is not None and _release(saved_torch) != _release(torch.__version__):
        raise ValueError(
            f"The artifact in {directory} was written with torch {saved_torch}, but torch {torch.__version__} is "
            "installed, and the layout of int8 modules may differ between releases. Install the same torch "
            "release, or pass check_versions=False to load it anyway."
        )


def _shapes(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return tuple(_shapes(item) for item in value)
    return None


def _shape_mismatches(expected: dict[str, Any], loaded: dict[str, Any]) -> list[str]:
    """Return ``key: expected shape != loaded shape`` for every key present in both state_dicts."""
    return [
        f"{key}: {_shapes(expected[key])} != {_shapes(value)}"
        for key, value in loaded.items()
        if key in expected and _shapes(expected[key]) != _shapes(value)
    ]


def _release(version: str) -> str:
    """Return a version without its local part: ``"2.13.0+cpu"`` becomes ``"2.13.0"``."""
    return version.split("+", 1)[0]


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
