"""Summaries of a quantization report: a Markdown table, a PNG figure and flat logger metrics.

The report is the dict that :class:`~lightning_dynq.callback.DynamicQuantCallback` keeps in
``callback.report`` and writes to ``report.json``::

    {
        "fake_quant": {"overall": {"test_accuracy": 0.91}, "per_bucket": {"0": {"test_accuracy": 0.93}}},
        "int8": {...same layout...},
        "latency_ms": {"fp32": {"0": 4.1}, "int8": {"0": 1.6}},   # optional
        "bucket_shapes": {"0": [32, 64]},                          # optional, batch x length
        "fp32_size_bytes": 90868104,
        "int8_size_bytes": 23310000,
        "artifact_dir": "...",
    }

Nothing here imports Lightning. matplotlib is optional (``pip install lightning-dynq[plot]``):
without it :func:`write_figure` logs one line and writes nothing.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SUMMARY_FILE = "report.md"
FIGURE_FILE = "report.png"

# Prefix of the flat metric names that :func:`flatten_report` returns for the Lightning logger.
METRIC_PREFIX = "quant_report"


def bucket_ids(report: Mapping[str, Any]) -> list[str]:
    """Return every bucket id in the report, numeric ids in numeric order and others after them."""
    ids: set[str] = set()
    for variant in ("fake_quant", "int8"):
        ids.update(report.get(variant, {}).get("per_bucket", {}))
    for timings in report.get("latency_ms", {}).values():
        ids.update(timings)
    return sorted(ids, key=_bucket_order)


def metric_names(report: Mapping[str, Any]) -> list[str]:
    """Return the sorted metric names found per bucket in the fake-quant or int8 results."""
    names: set[str] = set()
    for variant in ("fake_quant", "int8"):
        for metrics in report.get(variant, {}).get("per_bucket", {}).values():
            names.update(metrics)
    return sorted(names)


def format_markdown(report: Mapping[str, Any]) -> str:
    """Return a Markdown summary: metrics and latency per bucket, overall metrics and model sizes."""
    # Example counts (such as TextClassifier's test_examples) are the same for both variants,
    # so they get one integer column instead of a fake-quant / int8 pair.
    names = [name for name in metric_names(report) if not name.endswith("_examples")]
    count_names = [name for name in metric_names(report) if name.endswith("_examples")]
    lines = ["# Quantization report", ""]

    header = ["bucket", "shape (batch x length)", *count_names]
    for name in names:
        header += [f"fake-quant {name}", f"int8 {name}"]
    header += ["fp32 latency (ms)", "int8 latency (ms)", "fp32 / int8"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))

    latency = report.get("latency_ms", {})
    shapes = report.get("bucket_shapes", {})
    for bucket in bucket_ids(report):
        shape = shapes.get(bucket)
        row = [bucket, "-" if shape is None else " x ".join(str(size) for size in shape)]
        for name in count_names:
            count = _bucket_metric(report, "fake_quant", bucket, name)
            if count is None:
                count = _bucket_metric(report, "int8", bucket, name)
            row.append(_number(count, 0))
        for name in names:
            row.append(_number(_bucket_metric(report, "fake_quant", bucket, name)))
            row.append(_number(_bucket_metric(report, "int8", bucket, name)))
        fp32_ms = latency.get("fp32", {}).get(bucket)
        int8_ms = latency.get("int8", {}).get(bucket)
        row += [_number(fp32_ms, 2), _number(int8_ms, 2), _ratio(fp32_ms, int8_ms)]
        lines.append("| " + " | ".join(row) + " |")

    overall_names = sorted(
        set(report.get("fake_quant", {}).get("overall", {})) | set(report.get("int8", {}).get("overall", {}))
    )
    if overall_names:
        lines += ["", "| metric (all buckets) | fake-quant | int8 |", "|---|---|---|"]
        for name in overall_names:
            fake_quant = report.get("fake_quant", {}).get("overall", {}).get(name)
            int8 = report.get("int8", {}).get("overall", {}).get(name)
            lines.append(f"| {name} | {_number(fake_quant)} | {_number(int8)} |")

    fp32_size = report.get("fp32_size_bytes")
    int8_size = report.get("int8_size_bytes")
    lines += [
        "",
        f"Model size: {_megabytes(fp32_size)} float, {_megabytes(int8_size)} int8 "
        f"(int8 / float = {_ratio(int8_size, fp32_size)}).",
    ]
    if not latency:
        lines.append("Latency was not measured.")
    else:
        lines.append(
            "Latency: median forward time of one test batch per bucket on the CPU; the fp32 column is the "
            "trained model with fake quantization switched off."
        )
    if report.get("artifact_dir"):
        lines.append(f"Artifact: `{report['artifact_dir']}`.")
    return "\n".join(lines) + "\n"


def write_summary(directory: str | Path, report: Mapping[str, Any]) -> Path:
    """Write :func:`format_markdown` of ``report`` to ``directory/report.md`` and return the path."""
    path = Path(directory) / SUMMARY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_markdown(report))
    return path


def write_figure(directory: str | Path, report: Mapping[str, Any]) -> Path | None:
    """Draw per-bucket metrics and latencies of ``report`` to ``directory/report.png``.

    Returns the path, or None when matplotlib is not installed, which is logged in one line.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        log.info("matplotlib is not installed, so %s was not written; install lightning-dynq[plot].", FIGURE_FILE)
        return None

    buckets = bucket_ids(report)
    names = [name for name in metric_names(report) if not name.endswith("_examples")]
    positions = list(range(len(buckets)))
    labels = [_bucket_label(report, bucket) for bucket in buckets]
    width = 0.38

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    metric_axes, latency_axes = figure.subplots(1, 2)

    name = names[0] if names else None
    if "test_accuracy" in names:
        name = "test_accuracy"
    metric_values = []
    for offset, variant, label in ((-width / 2, "fake_quant", "fake-quant"), (width / 2, "int8", "int8")):
        values = [_or_nan(_bucket_metric(report, variant, bucket, name) if name else None) for bucket in buckets]
        bars = metric_axes.bar([p + offset for p in positions], values, width, label=label)
        # Printed values show differences too small to see in the bar heights.
        metric_axes.bar_label(bars, fmt="%.4f", fontsize=8)
        metric_values += values
    metric_axes.set_title(f"{name or 'no metric'} per bucket")
    metric_axes.set_xticks(positions, labels)
    metric_axes.set_xlabel("bucket (batch x length)")
    _leave_room_for_legend(metric_axes, metric_values)

    latency = report.get("latency_ms", {})
    latency_values = []
    for offset, variant in ((-width / 2, "fp32"), (width / 2, "int8")):
        values = [_or_nan(latency.get(variant, {}).get(bucket)) for bucket in buckets]
        bars = latency_axes.bar([p + offset for p in positions], values, width, label=variant)
        latency_axes.bar_label(bars, fmt="%.1f", fontsize=8)
        latency_values += values
    latency_axes.set_title("forward latency per bucket (ms, median)" if latency else "latency not measured")
    latency_axes.set_xticks(positions, labels)
    latency_axes.set_xlabel("bucket (batch x length)")
    latency_axes.set_ylabel("ms")
    _leave_room_for_legend(latency_axes, latency_values)

    figure.suptitle(
        f"Model size: {_megabytes(report.get('fp32_size_bytes'))} float, "
        f"{_megabytes(report.get('int8_size_bytes'))} int8"
    )
    path = Path(directory) / FIGURE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def write_report_files(directory: str | Path, report: Mapping[str, Any]) -> list[Path]:
    """Write ``report.md`` and, when matplotlib is installed, ``report.png`` into ``directory``."""
    written = [write_summary(directory, report)]
    figure = write_figure(directory, report)
    if figure is not None:
        written.append(figure)
    return written


def flatten_report(report: Mapping[str, Any]) -> dict[str, float]:
    """Return the report's numbers as flat ``quant_report/...`` names for a Lightning logger.

    Example names: ``quant_report/int8/test_accuracy``, ``quant_report/int8/test_accuracy/bucket_0``,
    ``quant_report/latency_ms/fp32/bucket_0``, ``quant_report/int8_size_bytes``.
    """
    flat: dict[str, float] = {}
    for variant in ("fake_quant", "int8"):
        results = report.get(variant, {})
        for name, value in results.get("overall", {}).items():
            flat[f"{METRIC_PREFIX}/{variant}/{name}"] = float(value)
        for bucket, metrics in results.get("per_bucket", {}).items():
            for name, value in metrics.items():
                flat[f"{METRIC_PREFIX}/{variant}/{name}/bucket_{bucket}"] = float(value)
    for variant, timings in report.get("latency_ms", {}).items():
        for bucket, value in timings.items():
            flat[f"{METRIC_PREFIX}/latency_ms/{variant}/bucket_{bucket}"] = float(value)
    for key in ("fp32_size_bytes", "int8_size_bytes"):
        if report.get(key) is not None:
            flat[f"{METRIC_PREFIX}/{key}"] = float(report[key])
    return flat


def median_latency_ms(run: Callable[[], Any], warmup: int = 2, repeats: int = 5) -> float:
    """Call ``run`` ``warmup`` times untimed, then ``repeats`` times, and return the median in milliseconds."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}.")
    for _ in range(warmup):
        run()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        timings.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(timings)


def largest_batch_per_bucket(batches: Iterable[Mapping[str, Any]], bucket_key: str = "bucket") -> dict[str, Mapping[str, Any]]:
    """Pick the batch with the most padded tokens of each bucket, keyed by bucket id as a string.

    Batches without ``bucket_key`` all count as one bucket named ``"all"``.
    """
    chosen: dict[str, Mapping[str, Any]] = {}
    sizes: dict[str, int] = {}
    for batch in batches:
        bucket_tensor = batch.get(bucket_key)
        bucket = str(int(bucket_tensor.reshape(-1)[0])) if isinstance(bucket_tensor, torch.Tensor) else "all"
        input_ids = batch.get("input_ids")
        size = int(input_ids.numel()) if isinstance(input_ids, torch.Tensor) else 0
        if bucket not in chosen or size > sizes[bucket]:
            chosen[bucket] = batch
            sizes[bucket] = size
    return chosen


def _leave_room_for_legend(axes: Any, values: list[float]) -> None:
    # The legend sits above the tallest bar instead of covering it.
    finite = [value for value in values if value == value]
    if finite and max(finite) > 0:
        axes.set_ylim(0, max(finite) * 1.25)
    axes.legend(loc="upper center", ncols=2)


def _bucket_metric(report: Mapping[str, Any], variant: str, bucket: str, name: str) -> float | None:
    return report.get(variant, {}).get("per_bucket", {}).get(bucket, {}).get(name)


def _bucket_label(report: Mapping[str, Any], bucket: str) -> str:
    shape = report.get("bucket_shapes", {}).get(bucket)
    return bucket if shape is None else f"{bucket}\n{shape[0]} x {shape[1]}"


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or not denominator:
        return "-"
    return f"{numerator / denominator:.2f}x"


def _megabytes(size: int | None) -> str:
    return "-" if size is None else f"{size / 1e6:.1f} MB"


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _bucket_order(bucket: str) -> tuple[int, str]:
    return (int(bucket), bucket) if bucket.isdigit() else (1 << 30, bucket)
