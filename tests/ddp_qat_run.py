"""QAT of the tiny BERT with DDP on 2 CPU processes (gloo); each rank saves its fake-quant states to OUTPUT/rank<N>.pt.

Usage: ``python ddp_qat_run.py OUTPUT``. Used by ``tests/test_ddp_qat.py``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from lightning.pytorch import Callback, Trainer, seed_everything  # noqa: E402
from qat_models import TinyBertClassifier, make_datamodule, trainer_options  # noqa: E402

from lightning_dynq import DynamicQuantCallback  # noqa: E402
from lightning_dynq.quantization import backend  # noqa: E402


class QuantStateRecorder(Callback):
    """Store the fake-quant state at the end of every training step, under ``key``."""

    def __init__(self, key: str, steps: list[dict]) -> None:
        self.key = key
        self.steps = steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.key == "local":
            self.steps.append({})
        self.steps[-1][self.key] = backend.quant_state(pl_module)


def main() -> None:
    output = Path(sys.argv[1])
    seed_everything(7)
    steps: list[dict] = []
    callback = DynamicQuantCallback(output_dir=str(output / "int8"))
    # Callbacks run in list order: the first recorder sees each rank's own ranges, the last the combined ones.
    recorders = [QuantStateRecorder("local", steps), callback, QuantStateRecorder("synced", steps)]
    trainer = Trainer(
        callbacks=recorders,
        **trainer_options(output, strategy="ddp", devices=2, max_epochs=1, limit_train_batches=4, limit_val_batches=0),
    )
    module = TinyBertClassifier()
    trainer.fit(module, datamodule=make_datamodule())
    record = {
        "steps": steps,
        "int8": callback.quantized_model.state_dict(),
        "fit_end_time": time.time(),
    }
    output.mkdir(parents=True, exist_ok=True)
    torch.save(record, output / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
