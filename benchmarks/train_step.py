"""Time of one QAT training step against one plain fp32 training step on the same batches.

Run from the repository root: ``python -m benchmarks.train_step [--shapes 32x16,16x32,8x64] [--threads 1] [--repeats 7]``.

The model is the pretrained all-MiniLM-L6-v2 encoder with a new 5-class head, trained with AdamW.
A step is forward, cross-entropy loss, backward and optimizer step. The QAT variants are prepared
with ``prepare_model`` (static and dynamic mode) and, as in ``DynamicQuantCallback``, the batch's
attention mask is set as the active padding mask, so activation observers skip padded positions.
Rows of a batch have random real lengths between half and all of the padded length. A fourth
variant, static QAT with observers frozen, is the step after ``freeze_observers_at``: fake
quantization only, no range updates. The variants are timed in turn within each repeat, so load
from other processes affects all of them alike.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.harness import fix_threads, machine_line, minilm_classifier, parse_shapes, print_table, save_results
from lightning_dynq.quantization import QuantRecipe, backend, padding, prepare_model


def make_batch(batch: int, length: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(batch * 1000 + length)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=generator)
    lengths[0] = length
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    input_ids = torch.randint(1000, 20000, (batch, length), generator=generator) * mask
    labels = torch.randint(0, 5, (batch,), generator=generator)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict, qat: bool) -> None:
    if qat:
        padding.set_active_mask(batch["attention_mask"])
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits, batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    finally:
        padding.set_active_mask(None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="32x16,16x32,8x64", help="batch shapes BATCHxLENGTH")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant and shape")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per variant and shape; the median is reported")
    parser.add_argument("--output", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    fix_threads(args.threads)
    print(machine_line(args.threads), flush=True)

    base = minilm_classifier(5)
    models = {"fp32": base}
    for mode in ("static", "dynamic"):
        prepared = copy.deepcopy(base)
        prepare_model(prepared, QuantRecipe(mode=mode))
        models[f"QAT {mode}"] = prepared
    frozen = copy.deepcopy(models["QAT static"])
    backend.enable_observers(frozen, False)
    models["QAT static frozen"] = frozen
    optimizers = {}
    for name, model in models.items():
        model.train()
        optimizers[name] = torch.optim.AdamW(model.parameters(), lr=1e-5)

    rows = []
    for batch_size, length in parse_shapes(args.shapes):
        batch = make_batch(batch_size, length)
        timings: dict[str, list[float]] = {name: [] for name in models}
        for repeat in range(args.warmup + args.repeats):
            for name, model in models.items():
                start = time.perf_counter()
                train_step(model, optimizers[name], batch, qat=name != "fp32")
                if repeat >= args.warmup:
                    timings[name].append((time.perf_counter() - start) * 1000.0)
        row = {"shape": f"{batch_size}x{length}", **{name: statistics.median(t) for name, t in timings.items()}}
        rows.append(row)
        print("  " + ", ".join(f"{k} {v:.1f} ms" if isinstance(v, float) else v for k, v in row.items()), flush=True)

    print()
    print_table(
        ["shape", "fp32 step ms", "QAT static step ms", "QAT static frozen step ms", "QAT dynamic step ms",
         "static / fp32", "static frozen / fp32", "dynamic / fp32"],
        [[r["shape"], r["fp32"], r["QAT static"], r["QAT static frozen"], r["QAT dynamic"],
          f"{r['QAT static'] / r['fp32']:.2f}x", f"{r['QAT static frozen'] / r['fp32']:.2f}x",
          f"{r['QAT dynamic'] / r['fp32']:.2f}x"] for r in rows],
    )
    save_results(args.output, {"machine": machine_line(args.threads), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
