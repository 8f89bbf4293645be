"""Lightning callback that runs quantization-aware training and exports an int8 model.

The quantization logic lives in :mod:`lightning_dynq.quantization`. This module only maps it
onto the Trainer lifecycle. It prepares in ``setup``, follows the schedule per batch, freezes
observers in evaluation loops, converts and saves when fitting ends, and records test metrics.
"""

from __future__ import annotations

import contextlib
import io
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_dynq import reporting
from lightning_dynq.quantization import artifacts, backend, padding
from lightning_dynq.quantization.convert import check_ready_to_convert, convert_copy, quantized_modules
from lightning_dynq.quantization.prepare import Preparation, boundaries, check_patterns, prepare_model, set_submodule
from lightning_dynq.quantization.recipe import MODULE_TYPE_NAMES, QuantRecipe
from lightning_dynq.tasks.common import split_batch

# Key of the quantization plan that DynamicQuantCallback adds to Lightning checkpoints.
QAT_CHECKPOINT_KEY = "lightning_dynq_qat"

# Hooks the callback replaces on the LightningModule instance while it runs.
_HOOK_WRAPPERS = ("configure_model", "on_load_checkpoint")

# Strategies that shard parameters, which eager-mode module swapping cannot follow.
_REJECTED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


class DynamicQuantCallback(Callback):
    """Quantization-aware training of an unmodified LightningModule, exported as an int8 model for x86 CPUs.

    The callback prepares the model in ``setup`` (before ``configure_optimizers``), trains with fake
    quantization, runs validation with frozen observers and, when fitting ends, converts a CPU copy
    to int8 and saves ``model.pt``, ``metadata.json`` and ``report.json`` under
    ``trainer.log_dir/int8`` (or ``output_dir``). The LightningModule itself stays a QAT model.

    Args:
        qconfig: engine name (``"fbgemm"``, ``"x86"``, ``"qnnpack"``, ``"onednn"``) or a ``QConfig``.
        engine: quantized engine for conversion and inference; default: the one named by ``qconfig``.
        mode: ``"static"`` or ``"dynamic"`` (Linear only, activations quantized per batch at run time).
        module_types: module types to quantize, from ``"Linear"``, ``"Conv1d"``, ``"Conv2d"``.
        include: module name patterns (fnmatch) to quantize; None selects every module of ``module_types``.
        exclude: module name patterns to keep float.
        overrides: name pattern to ``"static"``, ``"dynamic"`` or None (keep float).
        quantize_embeddings: quantize embedding weights (weight-only). Default False.
        fuse: fuse Conv-BN(-ReLU), Conv-ReLU, Linear-BN, Linear-ReLU found in ``nn.Sequential`` children.
        fuse_groups: extra groups of qualified module names to fuse.
        fake_quant_start: when fake quantization starts: int of optimizer steps or ``"N epochs"``.
        freeze_observers_at: when observer ranges stop updating (steps or ``"N epochs"``); None: never.
        freeze_bn_stats_at: when fused batch-norm statistics stop updating; None: never.
        mask_key: key of the padding mask in dict batches, so activation observers skip padding.
        output_dir: folder for the int8 artifact; default ``trainer.log_dir/int8``.
        restore_rng_state: save the Python, NumPy and torch (CPU and CUDA) random states in
            checkpoints and restore them at the first training batch after ``fit(ckpt_path=...)``,
            so dropout continues with the masks of an uninterrupted run. Default True.

    Raises:
        ValueError, TypeError: an invalid argument, named in the message with the allowed values.

    Example::

        callback = DynamicQuantCallback(qconfig="x86", exclude=["classifier"])
        trainer = Trainer(callbacks=[callback], max_epochs=3)
        trainer.fit(model, datamodule=datamodule)
        report = callback.test_fake_quant_and_int8(trainer, model, datamodule)
    """

    def __init__(
        self,
        qconfig: Any = "fbgemm",
        engine: str | None = None,
        mode: str = "static",
        module_types: Sequence[str] = MODULE_TYPE_NAMES,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        overrides: dict[str, str | None] | None = None,
        quantize_embeddings: bool = False,
        fuse: bool = True,
        fuse_groups: Sequence[Sequence[str]] = (),
        fake_quant_start: int | str = 0,
        freeze_observers_at: int | str | None = None,
        freeze_bn_stats_at: int | str | None = None,
        mask_key: str | None = "attention_mask",
        output_dir: str | None = None,
        restore_rng_state: bool = True,
    ) -> None:
        super().__init__()
        self.recipe = QuantRecipe(
            qconfig=qconfig,
            engine=engine,
            mode=mode,
            module_types=list(module_types),
            include=None if include is None else list(include),
            exclude=list(exclude),
            overrides=dict(overrides or {}),
            quantize_embeddings=quantize_embeddings,
            fuse=fuse,
            fuse_groups=[list(group) for group in fuse_groups],
            fake_quant_start=fake_quant_start,
            freeze_observers_at=freeze_observers_at,
            freeze_bn_stats_at=freeze_bn_stats_at,
            mask_key=mask_key,
        )
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.restore_rng_state = restore_rng_state
        self.quantized_model: torch.nn.Module | None = None
        self.artifact_dir: Path | None = None
        self.report: dict[str, Any] = {}
        self.preparation: Preparation | None = None

        self._schedule_state = {"fake_quant_enabled": None, "observers_frozen": False, "bn_frozen": False}
        self._fake_quant_ever_enabled = False
        self._saved_flags: dict[str, tuple[bool, bool]] | None = None
        self._int8_active = False
        self._original_configure_model: Any = None
        self._pending_rng_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------
    # Preparation

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            # validate/test/predict run the module as it is (float before fit, fake-quant after).
            # A QAT checkpoint given as ckpt_path is loaded after setup, so the module is prepared
            # from the plan stored in that checkpoint, just before its state_dict is loaded.
            if not boundaries(pl_module):
                self._wrap_on_load_checkpoint(pl_module)
            return
        strategy_name = type(trainer.strategy).__name__
        # Compare class names along the MRO, so subclasses are caught and DeepSpeed need not be installed.
        if any(cls.__name__ in _REJECTED_STRATEGIES for cls in type(trainer.strategy).__mro__):
            raise ValueError(
                f"DynamicQuantCallback does not support {strategy_name}: eager-mode quantization swaps whole "
                "modules, which sharded parameters cannot follow. Use strategy='ddp' or a single device."
            )

        lazy = is_overridden("configure_model", pl_module)
        self._prepare(pl_module, final=not lazy)
        if lazy and self._original_configure_model is None:
            self._wrap_configure_model(pl_module)

    def _prepare(self, pl_module: pl.LightningModule, final: bool) -> None:
        self.preparation = prepare_model(pl_module, self.recipe)
        if final:
            check_patterns(pl_module, self.recipe, self.preparation)
            rank_zero_info(f"DynamicQuantCallback (engine={self.recipe.engine}, mode={self.recipe.mode}):\n"
                           + self.preparation.summary())

    def _wrap_configure_model(self, pl_module: pl.LightningModule) -> None:
        """Run preparation again after ``configure_model``, so modules it builds are quantized too."""
        original = pl_module.configure_model
        self._original_configure_model = original

        def configure_model() -> None:
            original()
            self._prepare(pl_module, final=True)

        pl_module.configure_model = configure_model

    def _wrap_on_load_checkpoint(self, pl_module: pl.LightningModule) -> None:
        original = pl_module.on_load_checkpoint

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            # Prepare first, so that the module's own check (QATCheckpointMixin) finds a prepared module.
            if QAT_CHECKPOINT_KEY in checkpoint and not boundaries(pl_module):
                self.preparation = prepare_from_checkpoint(pl_module, checkpoint, self.recipe)
            original(checkpoint)

        pl_module.on_load_checkpoint = on_load_checkpoint

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        padding.set_active_mask(None)
        pl_module.__dict__.pop("on_load_checkpoint", None)

    # ------------------------------------------------------------------------------------------
    # Schedule and padding mask during training

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply_schedule(trainer, pl_module, force=True)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending_rng_state is not None:
            # Restored here, not in load_state_dict, because creating the dataloader iterators
            # and the sanity check between loading and the first batch draw random numbers.
            _set_rng_state(self._pending_rng_state)
            self._pending_rng_state = None
        self._apply_schedule(trainer, pl_module)
        key = self.recipe.mask_key
        if key is not None and isinstance(batch, Mapping) and isinstance(batch.get(key), torch.Tensor):
            padding.set_active_mask(batch[key])

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        padding.set_active_mask(None)
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            # Every rank observed only its own batch. Combining the ranges gives all ranks, and the
            # int8 model that rank 0 converts, the ranges of the global batch.
            backend.sync_observed_ranges(pl_module)

    def _apply_schedule(self, trainer: pl.Trainer, pl_module: pl.LightningModule, force: bool = False) -> None:
        schedule = self.recipe.schedule
        step, epoch = trainer.global_step, trainer.current_epoch
        state = self._schedule_state

        fake_quant_on = schedule["fake_quant_start"].reached(step, epoch)
        if force or fake_quant_on != state["fake_quant_enabled"]:
            backend.enable_fake_quant(pl_module, fake_quant_on)
            if fake_quant_on != state["fake_quant_enabled"] and state["fake_quant_enabled"] is not None:
                rank_zero_info(f"DynamicQuantCallback: fake quantization enabled at step {step}, epoch {epoch}.")
            state["fake_quant_enabled"] = fake_quant_on
        self._fake_quant_ever_enabled |= fake_quant_on

        freeze_observers = schedule["freeze_observers_at"]
        observers_frozen = freeze_observers is not None and freeze_observers.reached(step, epoch)
        if force or observers_frozen != state["observers_frozen"]:
            backend.enable_observers(pl_module, not observers_frozen)
            if observers_frozen and not state["observers_frozen"]:
                rank_zero_info(f"DynamicQuantCallback: observers frozen at step {step}, epoch {epoch}.")
            state["observers_frozen"] = observers_frozen

        freeze_bn = schedule["freeze_bn_stats_at"]
        bn_frozen = freeze_bn is not None and freeze_bn.reached(step, epoch)
        if bn_frozen and (force or not state["bn_frozen"]):
            backend.freeze_bn_stats(pl_module)
            if not state["bn_frozen"]:
                rank_zero_info(f"DynamicQuantCallback: batch-norm statistics frozen at step {step}, epoch {epoch}.")
            state["bn_frozen"] = True

    def state_dict(self) -> dict[str, Any]:
        state = {**self._schedule_state, "fake_quant_ever_enabled": self._fake_quant_ever_enabled}
        if self.restore_rng_state:
            state["rng_state"] = _get_rng_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._fake_quant_ever_enabled = bool(state_dict["fake_quant_ever_enabled"])
        for key in self._schedule_state:
            self._schedule_state[key] = state_dict[key]
        if self.restore_rng_state and state_dict.get("rng_state") is not None:
            self._pending_rng_state = state_dict["rng_state"]

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # The plan lets load_qat_checkpoint and trainer.validate/test/predict(ckpt_path=...) prepare
        # a fresh module before loading the fake-quant state.
        if self.preparation is not None:
            checkpoint[QAT_CHECKPOINT_KEY] = {
                "format_version": 1,
                "recipe": self.recipe.to_dict(),
                "plan": dict(self.preparation.quantized),
                "fused": [list(group) for group in self.preparation.fused],
            }

    # ------------------------------------------------------------------------------------------
    # Evaluation loops run the fake-quant model without updating observers

    def _freeze_for_evaluation(self, pl_module: pl.LightningModule) -> None:
        self._saved_flags = backend.observer_flags(pl_module)
        backend.enable_observers(pl_module, False)

    def _restore_after_evaluation(self, pl_module: pl.LightningModule) -> None:
        if self._saved_flags is not None:
            backend.set_observer_flags(pl_module, self._saved_flags)
            self._saved_flags = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._freeze_for_evaluation(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_after_evaluation(pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._freeze_for_evaluation(pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._freeze_for_evaluation(pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_after_evaluation(pl_module)

    # ------------------------------------------------------------------------------------------
    # Conversion and artifacts

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._fake_quant_ever_enabled:
            rank_zero_warn(
                f"DynamicQuantCallback: fake quantization never ran (fake_quant_start={self.recipe.fake_quant_start} "
                "was not reached), so the int8 model was not trained with quantization noise. Lower fake_quant_start."
            )
        if not self._schedule_state["observers_frozen"]:
            # Converting with live moving-average observers is the standard QAT recipe, so this is
            # information, not a warning.
            rank_zero_info(
                "DynamicQuantCallback: observers were still enabled, so the int8 ranges are the moving averages up to "
                "the last training batch. Set freeze_observers_at to train the last steps with fixed ranges."
            )

        self.artifact_dir = self.output_dir or Path(trainer.log_dir or trainer.default_root_dir) / "int8"
        self.quantized_model, int8_bytes = self._convert_on_rank_zero(trainer, pl_module)
        self.report = {
            "artifact_dir": str(self.artifact_dir),
            "fp32_size_bytes": artifacts.serialized_size(artifacts.float_state_dict(pl_module)),
            "int8_size_bytes": len(int8_bytes),
            "fake_quant": {},
            "int8": {},
        }
        if trainer.is_global_zero:
            self._save(trainer, int8_bytes)
        # Other ranks wait here until rank zero has written the artifact.
        trainer.strategy.barrier("lightning_dynq_int8_artifact")
        rank_zero_info(
            f"DynamicQuantCallback: int8 model saved to {self.artifact_dir} "
            f"({self.report['fp32_size_bytes']} bytes float, {self.report['int8_size_bytes']} bytes int8)."
        )

    def _convert_on_rank_zero(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[torch.nn.Module, bytes]:
        """Convert on rank zero and share its int8 weights; return the int8 model and its ``model.pt`` bytes.

        The ranges are checked on every rank first, so that an unconvertible model raises on all
        ranks instead of leaving the others waiting. With one process this is a plain conversion.
        Other ranks build the int8 module structure from their own QAT module (which holds the
        same state, see ``on_train_batch_end``) and load rank zero's weights into it.
        """
        check_ready_to_convert(pl_module)
        if trainer.world_size == 1:
            quantized = self._convert(trainer, pl_module, check=False)
            return quantized, artifacts.model_bytes(quantized)

        int8_bytes = None
        if trainer.is_global_zero:
            quantized = self._convert(trainer, pl_module, check=False)
            int8_bytes = artifacts.model_bytes(quantized)
        int8_bytes = trainer.strategy.broadcast(int8_bytes, src=0)
        if not trainer.is_global_zero:
            quantized = self._convert(trainer, pl_module, check=False)
            with backend.quantized_engine(self.recipe.engine):
                quantized.load_state_dict(torch.load(io.BytesIO(int8_bytes), weights_only=True))
        return quantized, int8_bytes

    def _convert(self, trainer: pl.Trainer, pl_module: pl.LightningModule, check: bool = True) -> torch.nn.Module:
        # The copy must not include the Trainer, nor the hook wrappers bound to pl_module. It is
        # made and converted on the CPU (see convert_copy), so pl_module stays on its device.
        wrappers = {name: pl_module.__dict__.pop(name) for name in _HOOK_WRAPPERS if name in pl_module.__dict__}
        try:
            return convert_copy(pl_module, self.recipe.engine, check=check, memo={id(trainer): None})
        finally:
            for name, wrapper in wrappers.items():
                setattr(pl_module, name, wrapper)

    def _save(self, trainer: pl.Trainer, int8_bytes: bytes) -> None:
        assert self.quantized_model is not None
        assert self.artifact_dir is not None
        assert self.preparation is not None
        artifacts.save_model(self.artifact_dir, int8_bytes)
        metadata = artifacts.build_metadata(
            self.recipe,
            quantized_modules(self.quantized_model),
            self.preparation.quantized,
            self.preparation.fused,
            getattr(trainer.datamodule, "bucket_boundaries", None),
        )
        artifacts.write_metadata(self.artifact_dir, metadata)
        self._publish_report(trainer)

    def _publish_report(self, trainer: pl.Trainer) -> None:
        """Write ``report.json``, ``report.md`` and ``report.png`` and log the report's numbers (rank zero)."""
        assert self.artifact_dir is not None
        artifacts.write_json(self.artifact_dir / artifacts.REPORT_FILE, self.report)
        reporting.write_report_files(self.artifact_dir, self.report)
        for logger in trainer.loggers:
            logger.log_metrics(reporting.flatten_report(self.report), step=trainer.global_step)
            logger.save()

    # ------------------------------------------------------------------------------------------
    # Test metrics: fake-quant and int8

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_after_evaluation(pl_module)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test_")}
        self.report["int8" if self._int8_active else "fake_quant"] = split_bucket_metrics(metrics)
        if trainer.is_global_zero and self.artifact_dir is not None:
            self._publish_report(trainer)

    @contextlib.contextmanager
    def int8_swapped(self, pl_module: pl.LightningModule) -> Iterator[pl.LightningModule]:
        """Put the int8 modules in place of the QAT modules of ``pl_module`` for the block.

        ``pl_module`` must be on the CPU, because int8 kernels run on the CPU only. The previous
        modules and quantized engine are restored on exit.

        Raises:
            RuntimeError: fitting has not ended yet, so there is no int8 model.
            ValueError: ``pl_module`` is not on the CPU or its quantized modules differ from the int8 model's.
        """
        if self.quantized_model is None:
            raise RuntimeError("No int8 model yet: int8_swapped needs trainer.fit(...) with this callback to finish first.")
        int8_modules = boundaries(self.quantized_model)
        qat_modules = boundaries(pl_module)
        if set(int8_modules) != set(qat_modules):
            raise ValueError(
                f"The quantized modules of {type(pl_module).__name__} {sorted(qat_modules)} differ from the int8 "
                f"model's {sorted(int8_modules)}: pass the LightningModule this callback trained."
            )
        devices = {p.device.type for p in pl_module.parameters()}
        if devices - {"cpu"}:
            raise ValueError(f"int8_swapped needs the LightningModule on the CPU, found devices {sorted(devices)}.")

        for name, module in int8_modules.items():
            set_submodule(pl_module, name, module)
        self._int8_active = True
        try:
            with backend.quantized_engine(self.recipe.engine):
                yield pl_module
        finally:
            self._int8_active = False
            for name, module in qat_modules.items():
                set_submodule(pl_module, name, module)

    def test_fake_quant_and_int8(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, datamodule: pl.LightningDataModule | None = None
    ) -> dict[str, Any]:
        """Test the fake-quant model, then the int8 model through the same loop, and return the report.

        The Trainer must run on the CPU. A summary table of each test metric per bucket (fake-quant
        vs int8) and the model sizes is logged on rank zero.
        """
        if trainer.strategy.root_device.type != "cpu":
            raise ValueError(
                f"test_fake_quant_and_int8 needs a CPU Trainer because int8 kernels run on the CPU, "
                f"got device {trainer.strategy.root_device}. Build Trainer(accelerator='cpu') for testing."
            )
        datamodule = datamodule if datamodule is not None else trainer.datamodule
        trainer.test(pl_module, datamodule=datamodule, verbose=False)
        with self.int8_swapped(pl_module):
            trainer.test(pl_module, datamodule=datamodule, verbose=False)
        if trainer.is_global_zero:
            self._measure_latency(pl_module, datamodule)
            if self.artifact_dir is not None:
                self._publish_report(trainer)
        rank_zero_info(format_report(self.report))
        return self.report

    def _measure_latency(self, pl_module: pl.LightningModule, datamodule: Any) -> None:
        """Time the float and int8 forward on the largest test batch of each bucket, into the report."""
        batches = reporting.largest_batch_per_bucket(datamodule.test_dataloader())
        flags = backend.observer_flags(pl_module)
        was_training = pl_module.training
        pl_module.eval()
        latency: dict[str, dict[str, float]] = {"fp32": {}, "int8": {}}
        try:
            for bucket, batch in batches.items():
                inputs, _ = split_batch(dict(batch))
                inputs.pop("labels", None)
                with torch.inference_mode():
                    backend.enable_fake_quant(pl_module, False)
                    backend.enable_observers(pl_module, False)
                    latency["fp32"][bucket] = reporting.median_latency_ms(lambda: pl_module(**inputs))
                    with self.int8_swapped(pl_module):
                        latency["int8"][bucket] = reporting.median_latency_ms(lambda: pl_module(**inputs))
                if isinstance(inputs.get("input_ids"), torch.Tensor):
                    self.report.setdefault("bucket_shapes", {})[bucket] = list(inputs["input_ids"].shape)
        except TypeError as error:
            # A forward that does not take the batch's tensors as keyword arguments cannot be timed here.
            rank_zero_info(f"DynamicQuantCallback: latency not measured, forward(**batch) failed: {error}")
            return
        finally:
            backend.set_observer_flags(pl_module, flags)
            pl_module.train(was_training)
        self.report["latency_ms"] = latency


def split_bucket_metrics(metrics: dict[str, float]) -> dict[str, Any]:
    """Split ``test_<name>`` and ``test_<name>/bucket_<i>`` keys into overall and per-bucket dicts."""
    overall: dict[str, float] = {}
    per_bucket: dict[str, dict[str, float]] = {}
    for key, value in sorted(metrics.items()):
        name, _, bucket = key.partition("/bucket_")
        if bucket:
            per_bucket.setdefault(bucket, {})[name] = value
        else:
            overall[key] = value
    return {"overall": overall, "per_bucket": per_bucket}


def format_report(report: dict[str, Any]) -> str:
    """Return a text table of test metrics per bucket, fake-quant vs int8, and the model sizes."""
    rows = [("metric", "bucket", "fake_quant", "int8")]
    fake_quant, int8 = report.get("fake_quant", {}), report.get("int8", {})
    for name in sorted(set(fake_quant.get("overall", {})) | set(int8.get("overall", {}))):
        rows.append((name, "all", _cell(fake_quant.get("overall", {}).get(name)), _cell(int8.get("overall", {}).get(name))))
    buckets = sorted(set(fake_quant.get("per_bucket", {})) | set(int8.get("per_bucket", {})), key=_bucket_order)
    for bucket in buckets:
        fq_bucket = fake_quant.get("per_bucket", {}).get(bucket, {})
        int8_bucket = int8.get("per_bucket", {}).get(bucket, {})
        for name in sorted(set(fq_bucket) | set(int8_bucket)):
            rows.append((name, bucket, _cell(fq_bucket.get(name)), _cell(int8_bucket.get(name))))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.append(f"size: {report.get('fp32_size_bytes')} bytes float, {report.get('int8_size_bytes')} bytes int8")
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _bucket_order(bucket: str) -> tuple[int, str]:
    return (int(bucket), bucket) if bucket.isdigit() else (1 << 30, bucket)


# ----------------------------------------------------------------------------------------------
# QAT checkpoints


def prepare_from_checkpoint(
    module: torch.nn.Module, checkpoint: Mapping[str, Any], recipe: QuantRecipe | None = None
) -> Preparation:
    """Prepare ``module`` in place with the quantization plan stored in a Lightning QAT checkpoint.

    ``recipe`` replaces the stored recipe; it is needed only when training used a ``QConfig`` object.

    Raises:
        ValueError: the checkpoint contains no plan, or the module lacks the planned modules.
    """
    stored = checkpoint.get(QAT_CHECKPOINT_KEY)
    if stored is None:
        raise ValueError(
            "No quantization plan found in the checkpoint, so it was not written by a Trainer with DynamicQuantCallback. "
            "Load it with the LightningModule's own load_from_checkpoint."
        )
    if recipe is None:
        recipe_data = dict(stored["recipe"])
        if isinstance(recipe_data["qconfig"], dict):
            raise ValueError(
                f"The checkpoint was trained with a custom QConfig {recipe_data['qconfig']['custom']}; pass "
                "recipe=QuantRecipe(qconfig=<the same QConfig>, ...) to rebuild it."
            )
        recipe = QuantRecipe(**recipe_data)
    return prepare_model(module, recipe, plan=stored["plan"], fuse_groups=stored["fused"])


def load_qat_checkpoint(
    checkpoint_path: str | Path, module: pl.LightningModule, recipe: QuantRecipe | None = None, strict: bool = True
) -> pl.LightningModule:
    """Prepare a freshly built LightningModule with the checkpoint's plan, then load its QAT state.

    The result is the fake-quant module of the checkpoint, with its scales, zero points, observer
    ranges and flags, ready for ``trainer.validate``/``test``/``predict`` or more QAT. A module
    prepared before gets its state loaded without a second preparation.

    Args:
        checkpoint_path: a ``.ckpt`` file written by a Trainer with :class:`DynamicQuantCallback`.
        module: the LightningModule built with the training arguments (float, not prepared).
        recipe: replaces the stored recipe; needed only when training used a ``QConfig`` object.
        strict: passed to ``load_state_dict``.

    Raises:
        ValueError: the checkpoint contains no quantization plan, or ``module`` does not have its architecture.

    Example::

        model = load_qat_checkpoint("lightning_logs/version_0/checkpoints/last.ckpt", MyModule())
    """
    # weights_only=False because Lightning checkpoints may hold hyperparameter objects; load only
    # checkpoints you trust, as with LightningModule.load_from_checkpoint.
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    if not boundaries(module):
        try:
            prepare_from_checkpoint(module, checkpoint, recipe)
        except (KeyError, AttributeError, AssertionError) as error:
            raise ValueError(
                f"Cannot prepare {type(module).__name__} with the plan of {checkpoint_path}: {error}. Build the "
                "module with the arguments used in training."
            ) from error
    module.load_state_dict(checkpoint["state_dict"], strict=strict)
    return module


def _get_rng_state() -> dict[str, Any]:
    # Only tensors and plain Python values, so that checkpoints still load with weights_only=True.
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached_gaussian)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
