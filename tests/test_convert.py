"""`internimage-hf convert`: strict key mapping, safe loading, atomic output, clear errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from internimage_hf.cli import main as cli_main
from internimage_hf.conversion.errors import ConversionError
from internimage_hf.conversion.keys import convert_official_state_dict
from internimage_hf.conversion.pipeline import convert
from internimage_hf.conversion.source import load_pth


def run_convert(*args) -> int:
    return cli_main(["convert", *map(str, args)])


@pytest.fixture()
def tiny_t(fixtures_dir):
    return fixtures_dir / "tiny_t" / "checkpoint.pth", fixtures_dir / "tiny_t" / "official_config.json"


def assert_nothing_left(parent):
    assert [p.name for p in parent.iterdir()] == [], list(parent.iterdir())


def test_key_mapping_is_complete_and_named(tiny_t):
    state = torch.load(tiny_t[0], weights_only=True)["model"]
    converted = convert_official_state_dict(state)
    assert len(converted) == len(state)
    assert "internimage.embeddings.norm1.weight" in converted
    assert "internimage.encoder.levels.0.layers.0.dcn.dw_conv.conv.weight" in converted
    assert "internimage.pooler.norm.running_var" in converted and "classifier.weight" in converted
    # no Sequential indices survive: norms, convs and heads are named, not numbered
    assert not [k for k in converted if re.search(r"(norm\w*|dw_conv|conv_head|head_x\d)\.\d+\.", k)]


def test_unknown_keys_are_listed(tiny_t, tmp_path):
    state = torch.load(tiny_t[0], weights_only=True)["model"]
    state["levels.0.blocks.0.surprise.weight"] = torch.zeros(1)
    del state["head.bias"]
    bad = tmp_path / "bad.pth"
    torch.save({"model": state}, bad)
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as info:
        convert(bad, out, official_config=tiny_t[1])
    text = str(info.value)
    assert "missing keys (1): classifier.bias" in text
    assert "unexpected keys (1): internimage.encoder.levels.0.layers.0.surprise.weight" in text
    assert not out.exists()


def test_wrong_shapes_are_reported(tiny_t, tmp_path):
    with pytest.raises(ConversionError, match="shape mismatches"):
        convert(tiny_t[0], tmp_path / "out", variant="t")
    assert not (tmp_path / "out").exists()


def test_truncated_checkpoint(tiny_t, tmp_path):
    data = tiny_t[0].read_bytes()
    broken = tmp_path / "src" / "truncated.pth"
    broken.parent.mkdir()
    broken.write_bytes(data[: len(data) // 2])
    out_parent = tmp_path / "dst"
    out_parent.mkdir()
    assert run_convert(broken, out_parent / "out", "--official-config", tiny_t[1]) == 1
    assert_nothing_left(out_parent)


class Arbitrary:
    """A non-tensor object: unpickling it would run code from the file's author."""


def test_pickled_objects_are_refused_without_trust(tmp_path, tiny_t):
    state = torch.load(tiny_t[0], weights_only=True)
    state["extra"] = Arbitrary()
    risky = tmp_path / "risky.pth"
    torch.save(state, risky)
    with pytest.raises(ConversionError, match="--trust-pickle"):
        load_pth(risky)
    assert "model" in torch.load(tiny_t[0], weights_only=True)
    assert len(load_pth(risky, trust_pickle=True)) == len(state["model"])


def test_existing_output_is_refused_unless_overwrite(tiny_t, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run_convert(tiny_t[0], out, "--official-config", tiny_t[1]) == 1
    assert (out / "keep.txt").read_text() == "mine"
    assert run_convert(tiny_t[0], out, "--official-config", tiny_t[1], "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind


def test_state_dict_layouts(tiny_t, tmp_path):
    state = torch.load(tiny_t[0], weights_only=True)["model"]
    for layout in ({"module": state}, state, {"model": state, "optimizer": {"lr": torch.tensor(1.0)}}):
        path = tmp_path / "ckpt.pth"
        torch.save(layout, path)
        assert len(load_pth(path)) == len(state)
    torch.save({"model": {}, "model_ema": state}, path)
    assert len(load_pth(path, use_ema=True)) == len(state)


def test_variant_or_config_required(tiny_t, tmp_path):
    with pytest.raises(ConversionError, match="--variant"):
        convert(tiny_t[0], tmp_path / "out")


def test_console_script_and_module_entry_points(tiny_t, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "internimage_hf",
            "convert",
            str(tiny_t[0]),
            str(out),
            "--official-config",
            str(tiny_t[1]),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "internimage" and config["architectures"] == ["InternImageForImageClassification"]
