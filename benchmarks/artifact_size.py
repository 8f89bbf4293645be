"""Size of the int8 artifact (``model.pt``) against the fp32 state_dict, for MiniLM and the MLP block.

Run from the repository root: ``python -m benchmarks.artifact_size``. Sizes are the bytes ``torch.save`` writes for each
state_dict, which is what ``DynamicQuantCallback`` writes as ``int8/model.pt``. The MiniLM model is
the pretrained all-MiniLM-L6-v2 encoder with a new random 5-class head (sizes do not depend on
fine-tuning). Each int8 variant is prepared, runs one random batch (so every observer has a
range), and is converted with ``convert_copy``.
"""

from __future__ import annotations

import argparse
import copy

import torch

from benchmarks.harness import fix_threads, machine_line, minilm_classifier, print_table, save_results
from benchmarks.latency import ENGINE, mlp_block, mlp_inputs, run_forward, token_inputs
from lightning_dynq.quantization import QuantRecipe, convert_copy, prepare_model
from lightning_dynq.quantization.artifacts import float_state_dict, serialized_size


def int8_size(model: torch.nn.Module, inputs: dict, **recipe: object) -> int:
    prepared = copy.deepcopy(model)
    prepare_model(prepared, QuantRecipe(qconfig=ENGINE, **recipe))
    prepared.eval()
    with torch.inference_mode():
        run_forward(prepared, inputs)
    return serialized_size(convert_copy(prepared, ENGINE).state_dict())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    fix_threads(1)
    print(machine_line(1))

    rows = []
    for name, model, inputs in (
        ("minilm", minilm_classifier(5), token_inputs(4, 32)),
        ("mlp", mlp_block(), mlp_inputs(4, 32)),
    ):
        fp32 = serialized_size(float_state_dict(model))
        variants = [("static", False), ("dynamic", False)]
        if name == "minilm":
            variants += [("static", True), ("dynamic", True)]
        for mode, embeddings in variants:
            size = int8_size(model, inputs, mode=mode, quantize_embeddings=embeddings)
            rows.append({
                "model": name, "mode": mode, "quantize_embeddings": embeddings,
                "fp32_bytes": fp32, "int8_bytes": size, "ratio": size / fp32,
            })

    print_table(
        ["model", "mode", "quantize_embeddings", "fp32 MB", "int8 MB", "int8 / fp32"],
        [[r["model"], r["mode"], r["quantize_embeddings"], r["fp32_bytes"] / 1e6, r["int8_bytes"] / 1e6,
          f"{r['ratio']:.3f}x"] for r in rows],
    )
    save_results(args.output, {"machine": machine_line(1), "rows": rows})


if __name__ == "__main__":
    main()
