"""The conversion and publishing tool (issue 4): detection on real-size state dicts, remote-code repos (sharded
too), Auto/pipeline loading of the output, model cards, Hub upload (faked), convert-all, and bad inputs."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from safetensors.torch import load_file, save_file

import internimage_hf  # noqa: F401  (registers the Auto classes)
from internimage_hf import VARIANTS, InternImageConfig, InternImageForImageClassification
from internimage_hf.cli import main as cli_main
from internimage_hf.conversion.batch import convert_all, summary_table
from internimage_hf.conversion.card import render_card
from internimage_hf.conversion.detect import architecture_from_state_dict, match_variant
from internimage_hf.conversion.errors import ConversionError
from internimage_hf.conversion.keys import convert_official_state_dict, rename_official_key
from internimage_hf.conversion.pipeline import SourceInfo, Verification, card_facts, plan_conversion
from internimage_hf.conversion.releases import (
    ALL_RELEASES,
    RELEASES,
    RELEASES_BY_NAME,
    load_manifest,
    manifest_text,
)
from internimage_hf.conversion.source import load_weights_folder
from internimage_hf.labels import imagenet_labels

from .conftest import REPO, rel_err
from .test_parity import tolerance

# ------------------------------------------------------------------------------------------------ test-only inverse
# The library has one forward mapping (official -> ours). Tests need official names for state dicts built from our
# classes, so they invert it here; `official_state_dict` checks the round trip against the library's mapping.
_INVERSE = [
    (re.compile(p), r)
    for p, r in [
        (r"^internimage\.", ""),
        (r"^embeddings\.conv([12])\.", r"patch_embed.conv\1."),
        (r"^embeddings\.norm([12])\.", r"patch_embed.norm\1.1."),
        (r"^encoder\.levels\.(\d+)\.layers\.(\d+)\.", r"levels.\1.blocks.\2."),
        (r"(\.blocks\.\d+)\.norm([12])\.", r"\1.norm\2.0."),
        (r"(\.blocks\.\d+)\.res_post_norm([12])\.", r"\1.res_post_norm\2.0."),
        (r"\.dcn\.dw_conv\.conv\.", ".dcn.dw_conv.0."),
        (r"\.dcn\.dw_conv\.norm\.", ".dcn.dw_conv.1.1."),
        (r"\.dcn\.center_feature_scale_proj\.(weight|bias)$", r".dcn.center_feature_scale_proj_\1"),
        (r"\.layer_scale([12])$", r".gamma\1"),
        (r"^encoder\.levels\.(\d+)\.post_norms\.(\d+)\.", r"levels.\1.post_norms.\2.0."),
        (r"^encoder\.levels\.(\d+)\.norm\.", r"levels.\1.norm.0."),
        (r"^encoder\.levels\.(\d+)\.downsample\.conv\.", r"levels.\1.downsample.conv."),
        (r"^encoder\.levels\.(\d+)\.downsample\.norm\.", r"levels.\1.downsample.norm.1."),
        (r"^pooler\.conv\.", "conv_head.0."),
        (r"^pooler\.stage4_proj\.", "dcnv3_head_x4.0."),
        (r"^pooler\.stage3_proj\.", "dcnv3_head_x3."),
        (r"^pooler\.attention\.norm_([qkv])\.", r"clip_projector.norm1_\1.0."),
        (r"^pooler\.attention\.", "clip_projector.cross_dcn."),
        (r"^classifier\.", "head."),
    ]
]
# state_dict sizes of the official models (research notes §3, counted from the official code)
OFFICIAL_KEY_COUNTS = {"t": 633, "s": 751, "b": 751, "l": 839, "xl": 883, "h": 1357, "g": 1295}
OFFICIAL_PARAMS_1K = {
    "t": 29.92e6,
    "s": 50.08e6,
    "b": 97.46e6,
    "l": 223.33e6,
    "xl": 334.82e6,
    "h": 1089.6e6,
    "g": 3076.4e6,
}


def official_name(ours: str, clip: bool) -> str:
    key = ours
    for pattern, replacement in _INVERSE:
        key = pattern.sub(replacement, key)
    if key.startswith("pooler.norm."):
        key = ("fc_norm.0." if clip else "conv_head.1.0.") + key.removeprefix("pooler.norm.")
    return key


def meta_model(variant: str, num_labels: int = 1000):
    with torch.device("meta"):
        return InternImageForImageClassification(InternImageConfig.from_variant(variant, num_labels=num_labels))


def official_state_dict(model, remote_code: bool = False) -> dict:
    """The model's state dict under official `.pth` names (or OpenGVLab remote-code names); meta tensors."""
    clip = model.config.use_clip_projector
    state = {}
    for ours, tensor in model.state_dict().items():
        name = official_name(ours, clip)
        assert rename_official_key(name) == ours, (ours, name)  # the inverse really inverts the library mapping
        if remote_code:
            name = "model." + re.sub(r"\.gamma([12])$", r".layer_scale\1", name)
        state[name] = tensor
    return state


def assert_nothing_left(parent):
    assert sorted(p.name for p in parent.iterdir()) == [], list(parent.iterdir())


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


# ------------------------------------------------------------------------------------------------ 1. all 11 releases
@pytest.mark.parametrize("release", RELEASES, ids=[r.name for r in RELEASES])
def test_every_official_release_is_detected_with_labels_resolution_and_card(release, tmp_path):
    model = meta_model(release.variant, release.num_labels)
    state = official_state_dict(model, remote_code=release.head == "22k")  # both layouts are covered
    if release.num_labels == 1000:
        assert len(state) == OFFICIAL_KEY_COUNTS[release.variant]
        assert abs(model.num_parameters() / OFFICIAL_PARAMS_1K[release.variant] - 1) < 1e-3
    converted = convert_official_state_dict(state)
    assert match_variant(architecture_from_state_dict(converted)) == release.variant

    # identified by its file name, and by architecture + head alone (the two agree)
    plan = plan_conversion(converted, source_name=release.source_file)
    assert plan_conversion(converted).release == plan.release == release
    assert plan.variant == release.variant and plan.config.offset_scale == VARIANTS[release.variant]["offset_scale"]
    assert plan.image_size == plan.config.image_size == release.image_size
    expected_size = 384 if release.head == "22k" else VARIANTS[release.variant]["eval_size"]
    assert release.image_size == expected_size  # the release's evaluation resolution
    assert plan.config.num_labels == release.num_labels
    assert plan.config.id2label == imagenet_labels(release.num_labels)
    assert plan.labels == ("imagenet-1k" if release.head == "1k" else "imagenet-22k")
    if release.head == "1k":
        assert plan.config.id2label[0] == "tench, Tinca tinca"

    facts = card_facts(
        plan,
        SourceInfo(release.source_file, [(release.source_file, "0" * 64)]),
        Verification(num_tensors=len(state)),
        model.num_parameters(),
        f"someone/{release.name}",
    )
    (tmp_path / "README.md").write_text(render_card(facts))
    card = ModelCard.load(tmp_path / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-classification"
    assert meta["license"] == "mit" and "internimage" in meta["tags"]
    assert meta["datasets"] == (
        ["imagenet-21k"]
        if release.head == "22k"
        else ["imagenet-21k", "imagenet-1k"]
        if release.base
        else ["imagenet-1k"]
    )
    text = card.text
    assert f"InternImage-{release.variant.upper()}" in text and release.source_file in text
    assert f"{release.image_size}x{release.image_size}" in text
    assert f'model="someone/{release.name}"' in text and "import internimage_hf" in text
    if release.base:
        assert meta["base_model"] == f"someone/{release.base}" and meta["base_model_relation"] == "finetune"
    else:
        assert "base_model" not in meta
    if release.top1 is not None:
        result = meta["model-index"][0]["results"][0]
        assert result["metrics"][0]["value"] == release.top1 and result["dataset"]["type"] == "imagenet-1k"
        assert f"{release.top1}%" in text and release.flops in text and release.params in text
    else:
        assert "model-index" not in meta and "top-1" not in text


def test_official_key_names_match_the_spec():
    names = set(official_state_dict(meta_model("h", 1000)))
    for key in (
        "patch_embed.norm1.1.weight",
        "levels.0.blocks.0.dcn.dw_conv.1.1.weight",
        "levels.0.blocks.0.res_post_norm1.0.weight",
        "levels.2.post_norms.4.0.bias",
        "levels.0.blocks.0.dcn.center_feature_scale_proj_weight",
        "clip_projector.cross_dcn.q_bias",
        "clip_projector.norm1_k.0.weight",
        "dcnv3_head_x4.0.weight",
        "fc_norm.0.weight",
        "head.weight",
    ):
        assert key in names, key
    names = set(official_state_dict(meta_model("b", 1000)))
    assert {
        "levels.3.blocks.3.gamma2",
        "conv_head.1.0.num_batches_tracked",
        "levels.2.downsample.norm.1.weight",
    } <= names


def test_wrong_variant_is_explained():
    converted = convert_official_state_dict(official_state_dict(meta_model("b", 1000)))
    with pytest.raises(ConversionError) as info:
        plan_conversion(converted, variant="t")
    assert str(info.value).startswith(
        "state dict looks like InternImage-B (channels 112, depths 4,4,21,4) but --variant t was given"
    )
    assert plan_conversion(converted, variant="B").variant == "b"  # agreeing override is fine


def test_renamed_file_does_not_borrow_another_release():
    converted = convert_official_state_dict(official_state_dict(meta_model("l", 1000)))
    plan = plan_conversion(converted, source_name="internimage_t_1k_224.pth")
    assert plan.release == RELEASES_BY_NAME["internimage-l-22kto1k-384"]
    with pytest.raises(ConversionError, match="--release internimage-t-1k-224 is InternImage-T"):
        plan_conversion(converted, release="internimage-t-1k-224")


def test_unknown_architecture_needs_official_config(fixtures_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(["convert", str(fixtures_dir / "tiny_g" / "checkpoint.pth"), str(out)]) == 1
    line = one_error_line(capsys)
    assert "unknown InternImage architecture (channels" in line and "--official-config" in line
    assert not out.exists()


def test_manifest_lists_every_release(tmp_path):
    path = REPO / "conversion" / "manifest.json"
    assert path.read_text() == manifest_text(), "regenerate: see conversion/README.md"
    _, entries = load_manifest(path)
    assert [e.name for e in entries] == [r.name for r in ALL_RELEASES] and len(entries) == 11 + 4  # + FlashInternImage
    assert [e.release for e in entries] == list(ALL_RELEASES)
    by_name = {e.name: e for e in entries}
    assert by_name["internimage-t-1k-224"].repo_id == "internimage-hf/internimage-t-1k-224"
    assert by_name["internimage-g-22kto1k-512"].base_model == "internimage-hf/internimage-g-jointto22k-384"
    _, entries = load_manifest(path, org="me")
    assert entries[0].repo_id == "me/internimage-t-1k-224"
    # a base model is published before its fine-tunes
    order = [e.name for e in entries]
    assert all(order.index(r.base) < order.index(r.name) for r in RELEASES if r.base)


# ------------------------------------------------------------------------------------------------ 2. remote-code repos
def _check_tiny_l_output(folder, fixtures_dir):
    from transformers import AutoModelForImageClassification

    expected = load_file(fixtures_dir / "tiny_l" / "expected.safetensors")
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(expected["pixel_values"]).logits
    assert rel_err(logits, expected["logits"]) < tolerance("tiny_l", model, expected["pixel_values"])
    return model, logits


@pytest.fixture(scope="module")
def tiny_l_tolerance(fixtures_dir):
    """--tolerance for tiny_l's float32-chaotic outputs: test_parity's logits rule, and its 2e-4 stage limit."""
    from internimage_hf.conversion.pipeline import model_from_official
    from internimage_hf.conversion.source import read_official_config

    model = model_from_official(
        torch.load(fixtures_dir / "tiny_l" / "checkpoint.pth", weights_only=True)["model"],
        read_official_config(fixtures_dir / "tiny_l" / "official_config.json"),
    )
    expected = load_file(fixtures_dir / "tiny_l" / "expected.safetensors")
    return max(tolerance("tiny_l", model, expected["pixel_values"]), 2e-4)


def test_remote_code_repo_converts_and_verifies(fixtures_dir, tmp_path, tiny_l_tolerance, capsys):
    out = tmp_path / "plain"
    expected = fixtures_dir / "tiny_l" / "expected.safetensors"
    assert (
        cli_main(
            [
                "convert",
                str(fixtures_dir / "tiny_l_remote_code_repo"),
                str(out),
                "--expected",
                str(expected),
                "--tolerance",
                str(tiny_l_tolerance),
            ]
        )
        == 0
    )
    stdout = capsys.readouterr().out
    assert "Verified against expected.safetensors: relative errors logits" in stdout
    card = ModelCard.load(out / "README.md")
    assert "match its reference outputs with relative errors logits" in card.text and ": passed." in card.text
    assert "tiny_l_remote_code_repo" in card.text and "/work/" not in card.text  # no local paths in the card
    _check_tiny_l_output(out, fixtures_dir)


def test_sharded_remote_code_repo_converts(fixtures_dir, tmp_path, tiny_l_tolerance):
    source = fixtures_dir / "tiny_l_remote_code_repo"
    sharded = tmp_path / "sharded_repo"
    sharded.mkdir()
    shutil.copy(source / "config.json", sharded / "config.json")
    tensors = load_file(source / "model.safetensors")
    keys = sorted(tensors)
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())}, "weight_map": {}}
    for number, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :]), 1):
        name = f"model-{number:05d}-of-00002.safetensors"
        save_file({k: tensors[k].contiguous() for k in part}, sharded / name, metadata={"format": "pt"})
        index["weight_map"].update({k: name for k in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))

    out = tmp_path / "from_sharded"
    assert (
        cli_main(
            [
                "convert",
                str(sharded),
                str(out),
                "--expected",
                str(fixtures_dir / "tiny_l" / "expected.safetensors"),
                "--tolerance",
                str(tiny_l_tolerance),
                "--max-shard-size",
                "1MB",
            ]
        )
        == 0
    )
    # the output is sharded too, and the same weights as converting the unsharded repo
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    card = ModelCard.load(out / "README.md").text
    assert "model-00001-of-00002.safetensors" in card and "model-00002-of-00002.safetensors" in card
    _check_tiny_l_output(out, fixtures_dir)
    plain = tmp_path / "plain"
    assert cli_main(["convert", str(source), str(plain)]) == 0
    from_shards, from_file = load_weights_folder(out), load_weights_folder(plain)
    assert from_shards.keys() == from_file.keys()
    assert all(torch.equal(from_shards[k], from_file[k]) for k in from_file)


# ------------------------------------------------------------------------------------------------ 3. Auto, pipeline
@pytest.fixture(scope="module")
def imagenet_head_checkpoint(fixtures_dir, tmp_path_factory):
    """tiny_t with a 1000-class head (random), saved as an official `.pth`."""
    state = torch.load(fixtures_dir / "tiny_t" / "checkpoint.pth", weights_only=True)["model"]
    generator = torch.Generator().manual_seed(0)
    width = state["head.weight"].shape[1]
    state["head.weight"] = torch.randn(1000, width, generator=generator) * 0.02
    state["head.bias"] = torch.zeros(1000)
    path = tmp_path_factory.mktemp("imagenet_head") / "tiny_t_in1k.pth"
    torch.save({"model": state}, path)
    return path, fixtures_dir / "tiny_t" / "official_config.json"


def test_output_loads_through_auto_classes_and_pipeline(imagenet_head_checkpoint, tmp_path):
    from PIL import Image
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, pipeline

    source, official_config = imagenet_head_checkpoint
    out = tmp_path / "tiny-in1k"
    assert (
        cli_main(["convert", str(source), str(out), "--official-config", str(official_config), "--image-size", "64"])
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    config = AutoConfig.from_pretrained(out)
    assert config.num_labels == 1000 and config.id2label[1] == "goldfish, Carassius auratus"
    assert config.image_size == 64
    processor = AutoImageProcessor.from_pretrained(out)
    assert processor.crop_size == {"height": 64, "width": 64}
    model = AutoModelForImageClassification.from_pretrained(out)
    assert type(model).__name__ == "InternImageForImageClassification"

    image = Image.new("RGB", (80, 70), (120, 30, 200))
    image.save(tmp_path / "cat.png")
    predictions = pipeline("image-classification", model=str(out))(image, top_k=3)
    names = set(imagenet_labels(1000).values())
    assert len(predictions) == 3 and all(p["label"] in names for p in predictions)

    card = ModelCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert (meta["library_name"], meta["pipeline_tag"], meta["license"]) == (
        "transformers",
        "image-classification",
        "mit",
    )
    assert meta["datasets"] == ["imagenet-1k"] and "tiny_t_in1k.pth (sha256" not in card.text
    assert "`tiny_t_in1k.pth` (sha256 `" in card.text and "64x64" in card.text

    # the card's usage snippet runs as written (with a local image instead of the URL)
    snippet = re.search(r"```python\n(.*?)```", card.text, re.S)[1]
    assert f'model="{out}"' in snippet
    snippet = snippet.replace("http://images.cocodataset.org/val2017/000000039769.jpg", str(tmp_path / "cat.png"))
    exec(compile(snippet, "card-snippet", "exec"), {})


def test_labels_none_and_custom_file(imagenet_head_checkpoint, tmp_path):
    from transformers import AutoConfig

    source, official_config = imagenet_head_checkpoint
    assert (
        cli_main(
            [
                "convert",
                str(source),
                str(tmp_path / "generic"),
                "--official-config",
                str(official_config),
                "--labels",
                "none",
            ]
        )
        == 0
    )
    assert AutoConfig.from_pretrained(tmp_path / "generic").id2label[3] == "LABEL_3"
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"class {i}" for i in range(1000)))
    assert (
        cli_main(
            [
                "convert",
                str(source),
                str(tmp_path / "named"),
                "--official-config",
                str(official_config),
                "--labels",
                str(names),
            ]
        )
        == 0
    )
    assert AutoConfig.from_pretrained(tmp_path / "named").id2label[999] == "class 999"
    assert "datasets" not in ModelCard.load(tmp_path / "named" / "README.md").data.to_dict()


# ------------------------------------------------------------------------------------------------ 4. upload path
class FakeHub:
    """Records what would be sent to the Hub; the uploaded folder's files are listed at upload time."""

    def __init__(self, fail: bool = False):
        self.calls, self.fail = [], fail

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        if self.fail:
            raise RuntimeError("401 Client Error: Unauthorized")
        files = sorted(p.name for p in __import__("pathlib").Path(kwargs["folder_path"]).iterdir())
        self.calls.append(("upload_folder", kwargs.pop("repo_id"), dict(kwargs, files=files)))
        return type("CommitInfo", (), {"pr_url": "https://huggingface.co/me/x/discussions/1", "commit_url": None})()


@pytest.fixture()
def fake_hub(monkeypatch):
    hub = FakeHub()
    for name in ("create_repo", "create_branch", "upload_folder"):
        monkeypatch.setattr(HfApi, name, lambda self, *a, _n=name, **k: getattr(hub, _n)(*a, **k))
    return hub


def test_push_to_hub_sends_repo_files_and_flags(fixtures_dir, tmp_path, fake_hub, capsys):
    out = tmp_path / "out"
    assert (
        cli_main(
            [
                "convert",
                str(fixtures_dir / "tiny_l_remote_code_repo"),
                str(out),
                "--push-to-hub",
                "me/tiny-l",
                "--private",
                "--revision",
                "conversion",
                "--create-pr",
                "--commit-message",
                "Add converted tiny-l",
            ]
        )
        == 0
    )
    assert "Pushed" in capsys.readouterr().out
    create, branch, upload = fake_hub.calls
    assert create == ("create_repo", "me/tiny-l", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert branch == ("create_branch", "me/tiny-l", {"branch": "conversion", "exist_ok": True, "repo_type": "model"})
    assert upload[1] == "me/tiny-l"
    sent = upload[2]
    assert sent["folder_path"] == str(out) and sent["revision"] == "conversion" and sent["create_pr"] is True
    assert sent["commit_message"] == "Add converted tiny-l" and sent["repo_type"] == "model"
    assert sent["files"] == ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    assert 'model="me/tiny-l"' in (out / "README.md").read_text()  # the card's snippet names the pushed repo


def test_push_defaults_and_upload_failure(fixtures_dir, tmp_path, monkeypatch, capsys):
    hub = FakeHub(fail=True)
    for name in ("create_repo", "create_branch", "upload_folder"):
        monkeypatch.setattr(HfApi, name, lambda self, *a, _n=name, **k: getattr(hub, _n)(*a, **k))
    out = tmp_path / "out"
    assert (
        cli_main(["convert", str(fixtures_dir / "tiny_l_remote_code_repo"), str(out), "--push-to-hub", "me/tiny-l"])
        == 1
    )
    line = one_error_line(capsys)
    assert line.startswith("internimage-hf convert: error: upload of") and "401 Client Error" in line
    assert hub.calls == [("create_repo", "me/tiny-l", {"private": False, "exist_ok": True, "repo_type": "model"})]
    assert (out / "config.json").is_file()  # the conversion itself succeeded and stays


def test_convert_all_with_push_progress_and_summary(fixtures_dir, tmp_path, fake_hub, capsys, tiny_l_tolerance):
    data = tmp_path / "src"
    data.mkdir()
    truncated = data / "broken.pth"
    raw = (fixtures_dir / "tiny_t" / "checkpoint.pth").read_bytes()
    truncated.write_bytes(raw[: len(raw) // 3])
    manifest = tmp_path / "manifest.json"
    manifest.write_text(
        json.dumps(
            {
                "org": "me",
                "source_repo": "OpenGVLab/InternImage",
                "entries": [
                    {
                        "name": "tiny-t",
                        "source": str(fixtures_dir / "tiny_t" / "checkpoint.pth"),
                        "official_config": str(fixtures_dir / "tiny_t" / "official_config.json"),
                        "expected": str(fixtures_dir / "tiny_t" / "expected.safetensors"),
                        "repo_id": "{org}/tiny-t",
                    },
                    {
                        "name": "broken",
                        "source": "broken.pth",
                        "official_config": str(fixtures_dir / "tiny_t" / "official_config.json"),
                    },
                    {"name": "not-downloadable", "source": "never_released_anywhere.pth"},
                    {
                        "name": "tiny-l-repo",
                        "source": str(fixtures_dir / "tiny_l_remote_code_repo"),
                        "expected": str(fixtures_dir / "tiny_l" / "expected.safetensors"),
                        "tolerance": tiny_l_tolerance,
                    },
                    {"name": "skipped", "source": "whatever.pth"},
                ],
            }
        )
    )
    out = tmp_path / "converted"
    code = cli_main(
        [
            "convert-all",
            str(manifest),
            "--source-dir",
            str(data),
            "--output-root",
            str(out),
            "--push",
            "--only",
            "tiny-t,broken",
            "--only",
            "not-downloadable,tiny-l-repo",
        ]
    )
    assert code == 1
    captured = capsys.readouterr()
    rows = {line.split()[0]: line for line in captured.out.splitlines()[2:]}
    assert list(rows) == ["tiny-t", "broken", "not-downloadable", "tiny-l-repo"]
    assert rows["tiny-t"].split()[1] == "pushed" and rows["tiny-l-repo"].split()[1] == "pushed"
    assert rows["broken"].split()[1] == "failed" and "truncated or corrupt" in rows["broken"]
    assert "offline mode (HF_HUB_OFFLINE=1)" in rows["not-downloadable"]
    assert "OpenGVLab/InternImage/never_released_anywhere.pth" in rows["not-downloadable"]
    assert re.search(r"tiny-t\s+pushed\s+\d+\.\d\s+\d+\.\d\dM", rows["tiny-t"])
    assert "tiny-t: 100%" in captured.err and "tiny-l-repo: 100%" in captured.err  # one bar per file
    assert "2 of 4 failed: broken, not-downloadable" in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["tiny-l-repo", "tiny-t"]  # nothing partial for the failures
    uploads = [c for c in fake_hub.calls if c[0] == "upload_folder"]
    assert [(c[1], c[2]["folder_path"]) for c in uploads] == [
        ("me/tiny-t", str(out / "tiny-t")),
        ("me/tiny-l-repo", str(out / "tiny-l-repo")),
    ]
    assert "tiny-t" in uploads[0][2]["commit_message"]

    # a later run pushes what an earlier run converted, without converting again
    fake_hub.calls.clear()
    stamp = (out / "tiny-t" / "model.safetensors").stat().st_mtime_ns
    assert (
        cli_main(
            ["convert-all", str(manifest), "--output-root", str(out), "--push", "--skip-existing", "--only", "tiny-t"]
        )
        == 0
    )
    assert capsys.readouterr().out.splitlines()[2].split()[:2] == ["tiny-t", "pushed"]
    assert (out / "tiny-t" / "model.safetensors").stat().st_mtime_ns == stamp
    assert [c[1] for c in fake_hub.calls if c[0] == "upload_folder"] == ["me/tiny-t"]
    # ... but not to a repo its card does not name
    assert (
        cli_main(
            [
                "convert-all",
                str(manifest),
                "--output-root",
                str(out),
                "--push",
                "--skip-existing",
                "--only",
                "tiny-t",
                "--org",
                "other",
            ]
        )
        == 1
    )
    assert "was converted for another repo id than other/tiny-t" in capsys.readouterr().out


def test_convert_all_with_an_injected_api(fixtures_dir, tmp_path):
    manifest = tmp_path / "m.json"
    manifest.write_text(
        json.dumps(
            {
                "entries": [
                    {
                        "name": "tiny-g",
                        "source": str(fixtures_dir / "tiny_g" / "checkpoint.pth"),
                        "repo_id": "me/tiny-g",
                        "official_config": str(fixtures_dir / "tiny_g" / "official_config.json"),
                    }
                ]
            }
        )
    )
    hub = FakeHub()
    results = convert_all(manifest, output_root=tmp_path / "out", push=True, private=True, api=hub)
    assert [(r.name, r.status) for r in results] == [("tiny-g", "pushed")]
    assert hub.calls[0] == ("create_repo", "me/tiny-g", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert hub.calls[1][2]["revision"] is None and hub.calls[1][2]["create_pr"] is False


def test_convert_all_rejects_unknown_only_names(tmp_path, capsys):
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"entries": [{"name": "a", "source": "a.pth"}]}))
    assert cli_main(["convert-all", str(manifest), "--only", "b"]) == 1
    assert "--only names not in the manifest: b" in one_error_line(capsys)


def test_summary_table_format():
    from internimage_hf.conversion.batch import EntryResult

    table = summary_table([EntryResult("a", "ok", 1.25, 29_918_424), EntryResult("bb", "failed", 0.5, error="boom")])
    assert table.splitlines()[0].split() == ["name", "status", "seconds", "params", "error"]
    assert table.splitlines()[2].split() == ["a", "ok", "1.2", "29.92M"]
    assert table.splitlines()[3].split() == ["bb", "failed", "0.5", "boom"]


# ------------------------------------------------------------------------------------------------ 5. bad inputs
def test_pickled_objects_refused_by_the_command(fixtures_dir, tmp_path, capsys):
    from .test_convert import Arbitrary

    checkpoint = torch.load(fixtures_dir / "tiny_t" / "checkpoint.pth", weights_only=True)
    checkpoint["extra"] = Arbitrary()
    risky = tmp_path / "src" / "risky.pth"
    risky.parent.mkdir()
    torch.save(checkpoint, risky)
    parent = tmp_path / "dst"
    parent.mkdir()
    args = [
        "convert",
        str(risky),
        str(parent / "out"),
        "--official-config",
        str(fixtures_dir / "tiny_t" / "official_config.json"),
    ]
    assert cli_main(args) == 1
    assert "--trust-pickle" in one_error_line(capsys)
    assert_nothing_left(parent)
    assert cli_main(args + ["--trust-pickle"]) == 0


@pytest.fixture()
def tiny_variants(monkeypatch, fixtures_dir):
    """Register tiny_t's and tiny_l's architectures as variants, so detection errors can be run end to end."""
    for name, case in (("tt", "tiny_t"), ("tl", "tiny_l")):
        fields = json.loads((fixtures_dir / case / "official_config.json").read_text())
        keep = {k: fields[k] for k in ("channels", "depths", "groups", "offset_scale", "layer_scale", "post_norm")}
        monkeypatch.setitem(VARIANTS, name, dict(keep, eval_size=64, train_drop_path_rate=0.0))


def test_wrong_variant_on_the_command_line(fixtures_dir, tmp_path, tiny_variants, capsys):
    parent = tmp_path / "dst"
    parent.mkdir()
    source = fixtures_dir / "tiny_l" / "checkpoint.pth"
    assert cli_main(["convert", str(source), str(parent / "out"), "--variant", "tt"]) == 1
    line = one_error_line(capsys)
    assert "state dict looks like InternImage-TL (channels 24, depths 1,1,3,1) but --variant tt was given" in line
    assert_nothing_left(parent)
    # detected without --variant, labelled generically (7 classes), at the variant's eval resolution
    assert cli_main(["convert", str(source), str(parent / "out")]) == 0
    assert "Model: InternImage-TL: channels 24" in capsys.readouterr().out
    assert json.loads((parent / "out" / "preprocessor_config.json").read_text())["crop_size"]["height"] == 64


def test_failed_verification_leaves_nothing(fixtures_dir, tmp_path, capsys):
    expected = load_file(fixtures_dir / "tiny_t" / "expected.safetensors")
    expected["logits"] = expected["logits"] + 0.1 * expected["logits"].std()
    wrong = tmp_path / "wrong_expected.safetensors"
    save_file(expected, wrong)
    parent = tmp_path / "dst"
    parent.mkdir()
    args = [
        "convert",
        str(fixtures_dir / "tiny_t" / "checkpoint.pth"),
        str(parent / "out"),
        "--official-config",
        str(fixtures_dir / "tiny_t" / "official_config.json"),
    ]
    assert cli_main(args + ["--expected", str(wrong)]) == 1
    line = one_error_line(capsys)
    assert "verification against wrong_expected.safetensors failed: relative errors logits" in line
    assert "exceed the tolerance 0.0001" in line
    assert_nothing_left(parent)
    # the true outputs pass at the default tolerance
    assert cli_main(args + ["--expected", str(fixtures_dir / "tiny_t" / "expected.safetensors")]) == 0


def test_disk_error_while_saving_leaves_nothing(fixtures_dir, tmp_path, monkeypatch, capsys):
    def full_disk(self, folder, **kwargs):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(InternImageForImageClassification, "save_pretrained", full_disk)
    parent = tmp_path / "dst"
    parent.mkdir()
    out = parent / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous conversion")
    assert (
        cli_main(
            [
                "convert",
                str(fixtures_dir / "tiny_t" / "checkpoint.pth"),
                str(out),
                "--official-config",
                str(fixtures_dir / "tiny_t" / "official_config.json"),
                "--overwrite",
            ]
        )
        == 1
    )
    assert "No space left on device" in one_error_line(capsys)
    assert sorted(p.name for p in parent.iterdir()) == ["out"]  # no temp folder
    assert (out / "keep.txt").read_text() == "previous conversion"  # the old output survives a failed overwrite


def test_hub_source_offline_is_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(["convert", "hf://nobody-here/no-such-internimage", str(out)]) == 1
    line = one_error_line(capsys)
    assert "hf://nobody-here/no-such-internimage cannot be fetched from the Hugging Face Hub: offline mode" in line
    assert not out.exists()
    # without hf:// it is a local path, and a missing one is an error (never a Hub lookup)
    assert cli_main(["convert", "nobody-here/no-such-internimage", str(out)]) == 1
    line = one_error_line(capsys)
    assert line.endswith(
        "nobody-here/no-such-internimage: no such file or folder (a Hugging Face Hub source is "
        "written hf://nobody-here/no-such-internimage)"
    )
    assert not out.exists()


def test_sharded_index_with_missing_shard(fixtures_dir, tmp_path, capsys):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(fixtures_dir / "tiny_l_remote_code_repo" / "config.json", repo)
    (repo / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.head.weight": "model-00001-of-00002.safetensors"}})
    )
    assert cli_main(["convert", str(repo), str(tmp_path / "out")]) == 1
    assert "lists shards that are not there: model-00001-of-00002.safetensors" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()
