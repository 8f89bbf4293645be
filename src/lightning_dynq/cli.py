"""The ``lightning-dynq`` command: LightningCLI with the quantization callback and bucketed data.

Subcommands ``fit``, ``validate``, ``test`` and ``predict`` come from LightningCLI and read the
same YAML files (``--config FILE``). The quantization callback is configured under ``quant:``
and the DataModule under ``data:``. After ``fit``, the command tests the fake-quant model and the
int8 model on the test split and writes ``report.json`` (turn it off with
``--test_after_fit false``).

``lightning-dynq data-report --config FILE`` builds only the DataModule of a configuration and
prints its bucket statistics, without loading a model or training.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_dynq.callback import DynamicQuantCallback
from lightning_dynq.datamodule import BucketingDataModule

DATA_REPORT_COMMAND = "data-report"


class DynqCLI(LightningCLI):
    """LightningCLI that adds the quantization callback and links data facts into the model."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(DynamicQuantCallback, "quant")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="After fit, test the fake-quant and the int8 model and write report.json.",
        )
        parser.link_arguments(
            "data",
            "model.init_args.num_labels",
            compute_fn=_num_labels_or_none,
            apply_on="instantiate",
        )

    def _run_subcommand(self, subcommand: str) -> None:
        root_existed = Path(self.trainer.default_root_dir).exists()
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            # A run that fails early (bad column, unmatched pattern) leaves no empty folders behind.
            _remove_empty_log_dir(self.trainer, remove_root=not root_existed)
            raise

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit", True):
            return
        callback = next(cb for cb in self.trainer.callbacks if isinstance(cb, DynamicQuantCallback))
        callback.test_fake_quant_and_int8(self.trainer, self.model, datamodule=self.datamodule)


def _remove_empty_log_dir(trainer: pl.Trainer, remove_root: bool) -> None:
    """Remove the run's log folder and its empty parents up to ``default_root_dir``, if all are empty.

    With ``remove_root`` (set when this run created ``default_root_dir``), an empty
    ``default_root_dir`` is removed too.
    """
    if trainer.log_dir is None or not trainer.is_global_zero:
        return
    path = Path(trainer.log_dir).resolve()
    root = Path(trainer.default_root_dir).resolve()
    while path != root and root in path.parents and path.is_dir() and not any(path.iterdir()):
        path.rmdir()
        path = path.parent
    if remove_root and root.is_dir() and not any(root.iterdir()):
        root.rmdir()


def _num_labels_or_none(datamodule: BucketingDataModule) -> Any:
    return datamodule.num_labels if datamodule.task == "classification" else None


def data_report_main(argv: list[str]) -> None:
    """Build the DataModule of a configuration file and print its bucket statistics."""
    from lightning_dynq.data.report import format_data_report

    parser = LightningArgumentParser(description="Print bucket statistics of a DataModule configuration.")
    parser.add_argument("--config", action="config", help="YAML file with a data: section.")
    parser.add_lightning_class_args(BucketingDataModule, "data")
    parser.add_argument("--model", type=dict[str, Any], default={}, help="Ignored; allowed so fit files work as they are.")
    parser.add_argument("--trainer", type=dict[str, Any], default={}, help="Ignored.")
    parser.add_argument("--quant", type=dict[str, Any], default={}, help="Ignored.")
    parser.add_argument("--seed_everything", type=Any, default=None, help="Ignored.")
    parser.add_argument("--test_after_fit", type=Any, default=None, help="Ignored.")
    config = parser.parse_args(argv)
    datamodule = parser.instantiate_classes(config)["data"]
    print(format_data_report(datamodule))


def main(args: list[str] | None = None) -> DynqCLI | None:
    """Run the ``lightning-dynq`` command with ``args`` (default: the process arguments).

    Returns the finished :class:`DynqCLI`, whose ``trainer`` contains the callbacks and their
    results, or ``None`` for ``data-report``.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == DATA_REPORT_COMMAND:
        data_report_main(argv[1:])
        return None

    return DynqCLI(
        pl.LightningModule,
        BucketingDataModule,
        subclass_mode_model=True,
        seed_everything_default=42,
        # None lets LightningCLI read sys.argv itself, which it prefers over an explicit list.
        args=None if args is None else argv,
        save_config_kwargs={"overwrite": True},
    )


def run() -> None:
    """Entry point of the ``lightning-dynq`` console script, which exits with status 0 on success."""
    main()


if __name__ == "__main__":
    run()
