"""Converting FlashInternImage (DCNv4) checkpoints: detection with and without --official-config, the four official
releases (real-size state dicts on the meta device), the manifest, the model card, and bad checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from internimage_hf import InternImageConfig
from internimage_hf.cli import main as cli_main
from internimage_hf.configuration_internimage import FLASH_VARIANTS, variant_key
from internimage_hf.conversion.batch import resolve_source
from internimage_hf.conversion.card import render_card
from internimage_hf.conversion.detect import architecture_from_state_dict, match_variant
from internimage_hf.conversion.keys import convert_official_state_dict
from internimage_hf.conversion.pipeline import SourceInfo, Verification, card_facts, plan_conversion
from internimage_hf.conversion.releases import FLASH_RELEASES, RELEASES_BY_NAME, load_manifest
from internimage_hf.labels import imagenet_labels

from .test_conversion_tool import meta_model, official_state_dict

REPO = Path(__file__).resolve().parents[1]
FLASH_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "flash"
# Parameters of each official model with its 1k head (fixture README, counted from the official code).
OFFICIAL_PARAMS_1K = {"flash_t": 29.82e6, "flash_s": 50.07e6, "flash_b": 97.45e6, "flash_l": 223.30e6}
# (top-1, params) from the OpenGVLab/DCNv4 README's "Released Models" table.
OFFICIAL_FIGURES = {
    "flash_t": (83.6, "30M"),
    "flash_s": (84.4, "50M"),
    "flash_b": (84.9, "97M"),
    "flash_l": (88.1, "223M"),
}


def fixture(case: str) -> tuple[Path, Path]:
    folder = FLASH_FIXTURES / case
    if not (folder / "checkpoint.pth").is_file():
        pytest.fail(f"FlashInternImage fixture {case!r} not found at {folder}")
    return folder / "checkpoint.pth", folder / "official_config.json"


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


# ------------------------------------------------------------------------------------------------ the four releases
@pytest.mark.parametrize("release", FLASH_RELEASES, ids=[r.name for r in FLASH_RELEASES])
def test_every_flash_release_is_detected_with_labels_resolution_and_card(release):
    model = meta_model(release.variant)
    assert abs(model.num_parameters() / OFFICIAL_PARAMS_1K[release.variant] - 1) < 2e-4
    state = official_state_dict(model)
    assert any(k.endswith(".dcn.offset_mask.weight") for k in state) and any(".dcn.value_proj." in k for k in state)
    converted = convert_official_state_dict(state)
    architecture = architecture_from_state_dict(converted)
    assert architecture.core_op == "DCNv4" and match_variant(architecture) == release.variant
    assert architecture.groups == tuple(FLASH_VARIANTS[release.variant]["groups"])

    plan = plan_conversion(converted, source_name=release.source_file)
    assert plan_conversion(converted).release == plan.release == release
    assert plan.config.core_op == "DCNv4" and plan.image_size == release.image_size
    assert release.image_size == FLASH_VARIANTS[release.variant]["eval_size"]
    assert plan.config.id2label == imagenet_labels(1000) and plan.labels == "imagenet-1k"
    assert (release.top1, release.params) == OFFICIAL_FIGURES[release.variant]
    assert release.source_repo == "OpenGVLab/DCNv4" and release.remote_code_repo is None

    facts = card_facts(
        plan,
        SourceInfo(release.source_file, [(release.source_file, "0" * 64)]),
        Verification(num_tensors=len(state)),
        model.num_parameters(),
        f"someone/{release.name}",
    )
    text = render_card(facts)
    title = f"FlashInternImage-{release.variant.removeprefix('flash_').upper()}"
    assert text.count(f"# {title} ({release.name})") == 1
    assert f"`{release.source_file}` in [`OpenGVLab/DCNv4`](https://huggingface.co/OpenGVLab/DCNv4)" in text
    assert "DCNv4" in plan.architecture_text() and "arxiv.org/abs/2401.06197" in text and "xiong2024efficient" in text
    assert f"{release.top1}%" in text and "- dcnv4" in text and "- dcnv3" not in text
    assert "Official FlashInternImage results" in text and "github.com/OpenGVLab/DCNv4" in text
    if release.variant == "flash_l":
        assert "imagenet-21k" in text  # fine-tuned from ImageNet-22k weights


def test_flash_and_dcnv3_t_are_told_apart():
    """Same channels/depths/groups, different core op: each is detected as itself."""
    for name in ("t", "flash_t"):
        converted = convert_official_state_dict(official_state_dict(meta_model(name)))
        assert match_variant(architecture_from_state_dict(converted)) == name


@pytest.mark.parametrize(
    "name", ["FlashInternImage-T", "flash_intern_image_t", "flash-t", "FLASH_T", "flash_internimage_t"]
)
def test_flash_variant_spellings(name):
    assert variant_key(name) == "flash_t"
    assert InternImageConfig.from_preset(name).core_op == "DCNv4"


# ------------------------------------------------------------------------------------------------ the command line
def test_fixture_without_official_config_is_detected_as_flash_and_refused(tmp_path, capsys):
    """Not a released variant: one line that names FlashInternImage/DCNv4 and asks for --official-config."""
    checkpoint, _ = fixture("flash_tiny_l")
    converted = convert_official_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    architecture = architecture_from_state_dict(converted)
    assert architecture.core_op == "DCNv4" and architecture.groups == (2, 4, 8, 16)
    assert architecture.dw_kernel_size == 3 and architecture.dcn_output_bias and architecture.mlp_fc2_bias
    assert cli_main(["convert", str(checkpoint), str(tmp_path / "out")]) == 1
    line = one_error_line(capsys)
    assert "unknown FlashInternImage architecture (DCNv4, channels 32" in line and "--official-config" in line
    assert not (tmp_path / "out").exists()


def test_fixture_with_official_config_writes_the_usual_folder(tmp_path, capsys):
    checkpoint, official_config = fixture("flash_tiny_t")
    out = tmp_path / "out"
    assert cli_main(["convert", str(checkpoint), str(out), "--official-config", str(official_config)]) == 0
    assert "Model: FlashInternImage (custom configuration)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["core_op"] == "DCNv4" and config["dw_kernel_size"] is None
    assert config["dcn_output_bias"] is False and config["mlp_fc2_bias"] is False
    assert len(config["id2label"]) == 10 and config["id2label"]["0"] == "LABEL_0"
    card = (out / "README.md").read_text()
    assert "# FlashInternImage (custom configuration)" in card and "DCNv4, no depthwise conv" in card


def test_wrong_flash_variant_is_one_line(tmp_path, capsys):
    checkpoint, _ = fixture("flash_tiny_t")
    assert cli_main(["convert", str(checkpoint), str(tmp_path / "out"), "--variant", "flash_b"]) == 1
    assert "does not fit FlashInternImage-B" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "drop, official_config, expected",
    [
        # strict loading with the official config: the missing tensor is named
        (
            "levels.0.blocks.0.dcn.value_proj.weight",
            True,
            "missing keys (1): internimage.encoder.levels.0.layers.0.dcn.value_proj.weight",
        ),
        # detection needs each level's offset_mask: it says which one is missing
        ("levels.2.blocks.0.dcn.offset_mask.weight", False, "no 'encoder.levels.2.layers.0.dcn.offset_mask.weight'"),
    ],
)
def test_flash_checkpoint_with_a_missing_key_is_one_clear_error(tmp_path, capsys, drop, official_config, expected):
    checkpoint, config = fixture("flash_tiny_l")
    state = torch.load(checkpoint, weights_only=True)["model"]
    del state[drop]
    bad = tmp_path / "src" / "bad.pth"
    bad.parent.mkdir()
    torch.save({"model": state}, bad)
    parent = tmp_path / "dst"
    parent.mkdir()
    args = ["convert", str(bad), str(parent / "out")] + (["--official-config", str(config)] if official_config else [])
    assert cli_main(args) == 1
    assert expected in one_error_line(capsys)
    assert list(parent.iterdir()) == []


def test_offset_mask_of_no_group_count_is_refused():
    converted = convert_official_state_dict(official_state_dict(meta_model("flash_t")))
    key = "internimage.encoder.levels.1.layers.0.dcn.offset_mask.weight"
    converted[key] = torch.empty(100, converted[key].shape[1], device="meta")
    with pytest.raises(ValueError, match="Level 1's DCNv4 offset_mask has 100 outputs"):
        architecture_from_state_dict(converted)


# ------------------------------------------------------------------------------------------------ the manifest
def test_manifest_has_the_four_flash_releases():
    _, entries = load_manifest(REPO / "conversion" / "manifest.json")
    flash = [e for e in entries if e.name.startswith("flash-")]
    assert [e.name for e in flash] == [r.name for r in FLASH_RELEASES]
    assert [e.source for e in flash] == [
        "flash_intern_image_t_1k_224.pth",
        "flash_intern_image_s_1k_224.pth",
        "flash_intern_image_b_1k_224.pth",
        "flash_internimage_l_22kto1k_384.pth",
    ]
    for entry in flash:
        assert entry.release == RELEASES_BY_NAME[entry.name] and entry.variant == entry.release.variant
        assert entry.source_repo == "hf://OpenGVLab/DCNv4" and entry.repo_id == f"internimage-hf/{entry.name}"
        assert entry.release.top1 == OFFICIAL_FIGURES[entry.variant][0]
    assert [e.release.image_size for e in flash] == [224, 224, 224, 384]
    # the Hub fallback uses the entry's own repo, not the manifest's OpenGVLab/InternImage
    url = "hf://OpenGVLab/DCNv4/flash_intern_image_t_1k_224.pth"
    assert resolve_source(flash[0], None, "hf://OpenGVLab/InternImage") == url


def test_manifest_local_copy_wins(tmp_path):
    _, entries = load_manifest(REPO / "conversion" / "manifest.json")
    entry = next(e for e in entries if e.name == "flash-internimage-l-22kto1k-384")
    (tmp_path / entry.source).write_bytes(b"")
    assert resolve_source(entry, tmp_path, "hf://OpenGVLab/InternImage") == str(tmp_path / entry.source)
    assert resolve_source(entry, tmp_path / "empty", None) == "hf://OpenGVLab/DCNv4/" + entry.source


def test_manifest_entry_source_repo_is_checked(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"entries": [{"name": "a", "source": "a.pth", "source_repo": "not a repo"}]}))
    with pytest.raises(ValueError, match="entry 1's source_repo 'not a repo' is not a Hub repo id"):
        load_manifest(path)
