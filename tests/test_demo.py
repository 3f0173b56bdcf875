"""The README's main job (`internimage-hf demo`) on a small budget, and its data set."""

from __future__ import annotations

import json

from internimage_hf.cli import main as cli_main
from internimage_hf.demo import load_digits_dataset


def test_digits_dataset_is_a_stratified_held_out_split():
    splits = load_digits_dataset()
    train, test = splits["train"], splits["test"]
    assert len(train) + len(test) == 1797 and len(test) == 360
    assert train.names == [str(i) for i in range(10)]
    image = test.images[0]
    assert image.mode == "RGB" and image.size == (32, 32)
    counts = [test.labels.count(k) for k in range(10)]
    assert min(counts) >= 34 and max(counts) <= 38  # every digit held out in proportion


def test_quick_demo_learns_saves_reloads_and_reports(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--quick", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "demo_results.json").read_text())
    # 10 classes: chance is 0.1. The quick budget (480 images, 3 epochs) lands well above 0.8.
    assert results["held_out_accuracy"] > 0.6, results
    assert results["held_out_images"] == 360 and results["quick"] is True
    # The pipeline's accuracy on the reloaded folder is what Trainer measured on the in-memory model.
    assert abs(results["held_out_accuracy"] - results["trainer_eval_accuracy"]) < 1e-9
    assert printed.rstrip().splitlines()[-1] == f"held-out accuracy: {results['held_out_accuracy']:.4f}"
    assert "held-out image 0: true" in printed
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert (out / "model" / name).is_file()
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["model_type"] == "internimage" and config["id2label"]["7"] == "7"
