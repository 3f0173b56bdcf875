"""Every Auto class and pipeline the README promises, from local folders, offline and with the Hub unreachable.

Each check runs in a fresh interpreter (so nothing earlier in the session warms a cache) with either
HF_HUB_OFFLINE=1, or online with HF_ENDPOINT pointing at a closed port on this machine: any Hub request then fails at
once, so a load that asks the Hub about a local folder fails (or would wait) instead of passing unnoticed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from internimage_hf import InternImageConfig, InternImageForImageClassification, make_image_processor

NETWORKS = {
    "offline": {"HF_HUB_OFFLINE": "1"},
    "unreachable": {
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HUB_ETAG_TIMEOUT": "2",
        "HF_HUB_DOWNLOAD_TIMEOUT": "2",
    },
}

CHECKS = {
    "AutoConfig": """
        config = AutoConfig.from_pretrained(folder)
        assert type(config).__name__ == "InternImageConfig" and config.num_labels == 3
    """,
    "AutoModel": """
        model = AutoModel.from_pretrained(folder)
        assert type(model).__name__ == "InternImageModel"
        assert model(pixels).pooler_output.shape[0] == 1
    """,
    "AutoModelForImageClassification": """
        model = AutoModelForImageClassification.from_pretrained(folder)
        assert type(model).__name__ == "InternImageForImageClassification"
        assert torch.allclose(model.eval()(pixels).logits, expected, atol=1e-5)
    """,
    "AutoBackbone": """
        import logging
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("transformers").addHandler(handler)
        backbone = AutoBackbone.from_pretrained(folder, out_features=["stage1", "stage4"])
        assert type(backbone).__name__ == "InternImageBackbone"
        assert [f.shape[1] for f in backbone(pixels).feature_maps] == [8, 64]
        text = " ".join(r.getMessage() for r in records)
        assert "UNEXPECTED" not in text.upper(), text  # the head of a classification checkpoint is expected-unused
    """,
    "AutoImageProcessor": """
        processor = AutoImageProcessor.from_pretrained(folder)
        inputs = processor(Image.new("RGB", (50, 40), (10, 200, 30)), return_tensors="pt")
        assert tuple(inputs["pixel_values"].shape) == (1, 3, 64, 64)
    """,
    "pipeline image-classification": """
        classify = pipeline("image-classification", model=folder)
        result = classify(Image.new("RGB", (50, 40), (10, 200, 30)))
        assert {r["label"] for r in result} <= {"cat", "dog", "fish"}
    """,
    "pipeline image-feature-extraction": """
        extract = pipeline("image-feature-extraction", model=folder)
        assert len(extract(Image.new("RGB", (50, 40), (10, 200, 30)))) == 1
    """,
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, Path]:
    torch.manual_seed(0)
    config = InternImageConfig(
        channels=8, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8], image_size=64, id2label={0: "cat", 1: "dog", 2: "fish"}
    )
    model = InternImageForImageClassification(config).eval()
    folder = tmp_path_factory.mktemp("auto") / "model"
    model.save_pretrained(folder)
    make_image_processor(64).save_pretrained(folder)
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(pixels).logits
    data = folder.parent / "data.pt"
    torch.save({"pixels": pixels, "logits": logits}, data)
    return folder, data


@pytest.mark.parametrize("network", list(NETWORKS))
@pytest.mark.parametrize("check", list(CHECKS))
def test_auto_classes_load_local_folders_without_the_hub(saved, check, network, tmp_path):
    folder, data = saved
    script = textwrap.dedent("""
        import sys, torch
        from PIL import Image
        import internimage_hf  # registers InternImage with the Auto classes
        from transformers import (AutoBackbone, AutoConfig, AutoImageProcessor, AutoModel,
                                  AutoModelForImageClassification, pipeline)
        folder = sys.argv[1]
        data = torch.load(sys.argv[2], weights_only=True)
        pixels, expected = data["pixels"], data["logits"]
        torch.set_grad_enabled(False)
    """) + textwrap.dedent(CHECKS[check])
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        NETWORKS[network],
        HF_HOME=str(tmp_path / "hf-home"),
        INTERNIMAGE_DCNV3_BACKEND="reference",
        PYTHONWARNINGS="ignore",
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(folder), str(data)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "hf-home").exists() or not any((tmp_path / "hf-home").rglob("*.json")), (
        "nothing may be fetched or cached from the Hub"
    )


def test_checks_cover_every_auto_class_the_readme_names():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in ("AutoBackbone", "AutoModelForImageClassification", "pipeline"):
        assert name in readme
    assert {"AutoConfig", "AutoModel", "AutoModelForImageClassification", "AutoBackbone", "AutoImageProcessor"} <= set(
        CHECKS
    )
    json.dumps(NETWORKS)  # the environments are plain strings (subprocess env)
