"""Fault injection for `internimage-hf convert` / `convert-all`: hostile manifests, Hub-looking paths, broken and
malicious files, bad weights, configs and label files, unwritable outputs, kill -9 during save.

Every failure must exit 1 with one line on stderr (no traceback) and write nothing at all; every success must write
only the output that was named. Inputs live in `tmp_path/in`, outputs in `tmp_path/work`, whose complete listing
(hidden entries included) is compared before and after each run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from internimage_hf.cli import main as cli_main
from internimage_hf.conversion.output import _host_tag, sweep_staging

OUTPUT_FILES = ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
WEIGHT = "levels.0.blocks.0.mlp.fc1.weight"  # an ordinary weight of tiny_t's official state dict


# ------------------------------------------------------------------------------------------------ helpers
def listing(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def stderr_lines(capsys) -> tuple[str, list[str]]:
    captured = capsys.readouterr()
    return captured.out, [line for line in captured.err.splitlines() if line.strip()]


class Env:
    def __init__(self, tmp_path: Path, fixtures_dir: Path, capsys):
        self.tmp, self.capsys = tmp_path, capsys
        self.inputs = tmp_path / "in"
        self.work = tmp_path / "work"
        self.marker_dir = tmp_path / "markers"
        for folder in (self.inputs, self.work, self.marker_dir):
            folder.mkdir()
        self.ckpt = fixtures_dir / "tiny_t" / "checkpoint.pth"
        self.config = fixtures_dir / "tiny_t" / "official_config.json"
        self.repo = fixtures_dir / "tiny_l_remote_code_repo"
        self.out = self.work / "out"

    def state(self) -> dict:
        return dict(torch.load(self.ckpt, weights_only=True)["model"])

    def save_pth(self, obj, name: str = "ckpt.pth") -> Path:
        path = self.inputs / name
        torch.save(obj, path)
        return path

    def write(self, name: str, data: str | bytes) -> Path:
        path = self.inputs / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
        return path

    def convert_args(self, source, *extra, config: bool = True) -> list[str]:
        args = ["convert", str(source), str(self.out)]
        if config:
            args += ["--official-config", str(self.config)]
        return args + [str(e) for e in extra]

    def fails(self, args: list[str], *expected: str) -> str:
        """Exit 1, one stderr line naming what is wrong, nothing written under work/."""
        before = listing(self.work)
        code = cli_main(args)
        _, err = stderr_lines(self.capsys)
        assert code == 1, err
        assert len(err) == 1, err
        line = err[0]
        assert line.startswith(f"internimage-hf {args[0]}: error: ") and "Traceback" not in line, line
        for text in expected:
            assert text in line, line
        assert listing(self.work) == before
        return line

    def succeeds(self, args: list[str], out: Path | None = None) -> str:
        """Exit 0; the only new paths are inside the named output; no staging folder is left."""
        out = out or self.out
        before = listing(self.work)
        code = cli_main(args)
        stdout, err = stderr_lines(self.capsys)
        assert code == 0, err
        new = set(listing(self.work)) - set(before)
        prefix = out.relative_to(self.work).as_posix()
        ancestors = {parent.as_posix() for parent in Path(prefix).parents}  # folders created to hold the output
        assert all(p == prefix or p.startswith(prefix + "/") or p in ancestors for p in new), new
        assert sorted(p.name for p in out.iterdir()) == OUTPUT_FILES
        assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
        return stdout


@pytest.fixture()
def env(tmp_path, fixtures_dir, capsys):
    return Env(tmp_path, fixtures_dir, capsys)


class Marker:
    """Unpickling this creates a folder: the proof that a pickle ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


# ------------------------------------------------------------------------------------------------ manifest names
HOSTILE_NAMES = {
    "dotdot-slash": "../escaped",
    "dotdot": "..",
    "dot": ".",
    "empty": "",
    "slash": "a/b",
    "backslash": "a\\b",
    "nul": "x\x00y",
    "hidden": ".hidden",
    "leading-space": " x",
    "trailing-dot": "name.",
    "nested-dotdot": "a/../../x",
    "too-long": "a" * 200,
    "number": 5,
    "null": None,
    "absolute": "ABSOLUTE",  # replaced by the absolute path of an unrelated folder
}


@pytest.mark.parametrize("name", list(HOSTILE_NAMES.values()), ids=list(HOSTILE_NAMES))
def test_hostile_manifest_names_are_refused_before_anything_is_written(env, name):
    unrelated = env.tmp / "unrelated"
    unrelated.mkdir()
    (unrelated / "precious.txt").write_text("do not delete")
    if name == "ABSOLUTE":
        name = str(unrelated)
    manifest = env.write(
        "m.json",
        json.dumps(
            {
                "entries": [
                    {"name": "fine", "source": str(env.ckpt), "official_config": str(env.config)},
                    {"name": name, "source": str(env.ckpt), "official_config": str(env.config)},
                ]
            }
        ),
    )
    line = env.fails(
        ["convert-all", str(manifest), "--output-root", str(env.work / "converted"), "--overwrite"], "entry 2's name"
    )
    assert "output folder under --output-root" in line
    assert not (env.work / "converted").exists()  # not even the good entry: the manifest is refused as a whole
    assert (unrelated / "precious.txt").read_text() == "do not delete"
    assert sorted(p.name for p in env.tmp.iterdir()) == ["in", "markers", "unrelated", "work"]


def test_manifest_entry_with_a_nul_source_is_refused(env):
    manifest = env.write("m.json", json.dumps({"entries": [{"name": "a", "source": "ck\x00pt.pth"}]}))
    env.fails(["convert-all", str(manifest), "--output-root", str(env.work / "c")], "entry 1's source")


def test_manifest_source_repo_must_be_a_repo_id(env):
    manifest = env.write(
        "m.json", json.dumps({"source_repo": "../../etc", "entries": [{"name": "a", "source": "a.pth"}]})
    )
    env.fails(["convert-all", str(manifest), "--output-root", str(env.work / "c")], "is not a Hub repo id")


def test_a_plain_name_converts_inside_the_output_root(env):
    manifest = env.write(
        "m.json",
        json.dumps({"entries": [{"name": "tiny-t_1.0", "source": str(env.ckpt), "official_config": str(env.config)}]}),
    )
    env.succeeds(
        ["convert-all", str(manifest), "--output-root", str(env.work / "converted")],
        out=env.work / "converted" / "tiny-t_1.0",
    )


# ------------------------------------------------------------------------------------------------ Hub-looking paths
@pytest.fixture()
def hub_cache(env, monkeypatch):
    """An offline Hub cache holding `owner/name`: `evil.pth` (a pickle that would create a marker) and `good.pth`."""
    from huggingface_hub import constants

    cache = env.tmp / "hf-cache"
    commit = "a" * 40
    snapshot = cache / "models--owner--name" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (cache / "models--owner--name" / "refs").mkdir()
    (cache / "models--owner--name" / "refs" / "main").write_text(commit)
    checkpoint = torch.load(env.ckpt, weights_only=True)
    torch.save(dict(checkpoint, extra=Marker(env.marker_dir / "hub-pickle-ran")), snapshot / "evil.pth")
    shutil.copy(env.ckpt, snapshot / "good.pth")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.mark.parametrize("source", ["owner/name/evil.pth", "owner/name", "weights/old/ckpt.pth"])
def test_missing_local_path_is_never_a_hub_lookup(env, hub_cache, source, monkeypatch):
    monkeypatch.chdir(env.tmp)
    line = env.fails(
        env.convert_args(source, "--trust-pickle"), f"{source}: no such file or folder", f"written hf://{source}"
    )
    assert "cannot be fetched" not in line
    assert not (env.marker_dir / "hub-pickle-ran").exists()


def test_missing_absolute_path(env):
    env.fails(env.convert_args(env.inputs / "nowhere" / "ckpt.pth"), "nowhere/ckpt.pth: no such file or folder")


def test_trust_pickle_never_applies_to_a_hub_source(env, hub_cache):
    env.fails(env.convert_args("hf://owner/name/evil.pth", "--trust-pickle"), "--trust-pickle applies only to a local")
    assert not (env.marker_dir / "hub-pickle-ran").exists()


def test_a_downloaded_pickle_is_read_weights_only(env, hub_cache):
    env.fails(env.convert_args("hf://owner/name/evil.pth"), "refusing to unpickle a downloaded file")
    assert not (env.marker_dir / "hub-pickle-ran").exists()


def test_convert_all_trust_pickle_does_not_reach_downloads(env, hub_cache):
    manifest = env.write(
        "m.json",
        json.dumps(
            {
                "source_repo": "hf://owner/name",
                "entries": [{"name": "evil", "source": "evil.pth", "official_config": str(env.config)}],
            }
        ),
    )
    before = listing(env.work)
    assert (
        cli_main(
            [
                "convert-all",
                str(manifest),
                "--source-dir",
                str(env.inputs),
                "--output-root",
                str(env.work / "c"),
                "--trust-pickle",
            ]
        )
        == 1
    )
    out, err = stderr_lines(env.capsys)
    assert "refusing to unpickle a downloaded file" in out and "1 of 1 failed: evil" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert listing(env.work) == before and not (env.marker_dir / "hub-pickle-ran").exists()


def test_manifest_without_source_repo_downloads_nothing(env, hub_cache):
    manifest = env.write(
        "m.json", json.dumps({"entries": [{"name": "a", "source": "good.pth", "official_config": str(env.config)}]})
    )
    before = listing(env.work)
    assert (
        cli_main(["convert-all", str(manifest), "--source-dir", str(env.inputs), "--output-root", str(env.work / "c")])
        == 1
    )
    out, _ = stderr_lines(env.capsys)
    assert "good.pth: no such file or folder" in out and listing(env.work) == before


@pytest.mark.parametrize("source", ["hf://owner/name/../../x.pth", "hf://owner", "hf://", "hf://owner/name/a//b"])
def test_malformed_hub_references(env, source):
    env.fails(env.convert_args(source), "not a Hub reference")


def test_explicit_hub_source_converts_from_the_offline_cache(env, hub_cache):
    env.succeeds(env.convert_args("hf://owner/name/good.pth"))
    assert (
        "`hf://owner/name/good.pth`" in (env.out / "README.md").read_text()
        or "hf://owner/name/good.pth" in (env.out / "README.md").read_text()
    )


# ------------------------------------------------------------------------------------------------ broken files
@pytest.mark.parametrize("cut", [0, 10, 0.5, -100], ids=["empty", "10-bytes", "half", "all-but-100"])
def test_truncated_pth(env, cut):
    data = env.ckpt.read_bytes()
    end = int(len(data) * cut) if isinstance(cut, float) else (cut if cut >= 0 else len(data) + cut)
    source = env.write("truncated.pth", data[:end])
    env.fails(env.convert_args(source), "truncated.pth")


def test_text_file_named_pth(env):
    env.fails(env.convert_args(env.write("notes.pth", "just some text\n")), "is not a readable PyTorch checkpoint")


def remote_code_copy(env, name="repo") -> Path:
    folder = env.inputs / name
    shutil.copytree(env.repo, folder)
    return folder


@pytest.mark.parametrize("damage", ["truncated", "garbage-header", "no-weights", "bad-index", "bad-config"])
def test_broken_remote_code_folders(env, damage):
    folder = remote_code_copy(env)
    weights = folder / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:5000])
        expected = "could not be read (truncated or corrupt?)"
    elif damage == "garbage-header":
        weights.write_bytes(b"\xff" * 64)
        expected = "could not be read (truncated or corrupt?)"
    elif damage == "no-weights":
        weights.unlink()
        expected = "has no model.safetensors or pytorch_model.bin"
    elif damage == "bad-index":
        weights.unlink()
        (folder / "model.safetensors.index.json").write_text("{not json")
        expected = "is not a readable shard index"
    else:
        (folder / "config.json").write_text("[1, 2")
        expected = "config.json is not a readable JSON file"
    env.fails(["convert", str(folder), str(env.out)], expected)


# ------------------------------------------------------------------------------------------------ pickles
@pytest.mark.parametrize("where", ["beside-model", "whole-file", "inside-state-dict"])
def test_pickled_code_never_runs_without_trust(env, where):
    marker = env.marker_dir / "pickle-ran"
    state = env.state()
    if where == "beside-model":
        obj = {"model": state, "extra": Marker(marker)}
    elif where == "whole-file":
        obj = Marker(marker)
    else:
        obj = {"model": dict(state, surprise=Marker(marker))}
    env.fails(env.convert_args(env.save_pth(obj)), "refusing to unpickle it", "--trust-pickle")
    assert not marker.exists()


def test_pickle_in_a_folder_bin_never_runs_even_with_trust(env):
    marker = env.marker_dir / "bin-ran"
    folder = remote_code_copy(env)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(dict(tensors, extra=Marker(marker)), folder / "pytorch_model.bin")
    env.fails(["convert", str(folder), str(env.out), "--trust-pickle"], "pytorch_model.bin")
    assert not marker.exists()


def test_trust_pickle_is_the_opt_in_for_the_named_file(env):
    marker = env.marker_dir / "opted-in"
    source = env.save_pth({"model": env.state(), "extra": Marker(marker)})
    env.succeeds(env.convert_args(source, "--trust-pickle"))
    assert marker.exists()  # the user named this file and opted in


def test_legacy_non_zip_checkpoint_converts(env):
    path = env.inputs / "legacy.pth"
    torch.save({"model": env.state()}, path, _use_new_zipfile_serialization=False)
    env.succeeds(env.convert_args(path))


@pytest.mark.parametrize("obj", ["list", "int-entry"])
def test_not_a_state_dict(env, obj):
    state = env.state()
    if obj == "list":
        env.fails(env.convert_args(env.save_pth(list(state.values()))), "does not contain a state dict (found list)")
    else:
        env.fails(env.convert_args(env.save_pth({"model": dict(state, step=3)})), "entries that are not tensors: step")


# ------------------------------------------------------------------------------------------------ key sets
def test_wrong_key_sets(env):
    state = env.state()
    missing = dict(state)
    del missing["head.bias"]
    env.fails(env.convert_args(env.save_pth({"model": missing}, "missing.pth")), "missing keys (1): classifier.bias")
    extra = dict(state, **{"levels.0.blocks.0.surprise.weight": torch.zeros(2)})
    env.fails(
        env.convert_args(env.save_pth({"model": extra}, "extra.pth")),
        "unexpected keys (1): internimage.encoder.levels.0.layers.0.surprise.weight",
    )
    clash = dict(
        state, **{"levels.0.blocks.0.layer_scale1": torch.ones(16), "levels.0.blocks.0.gamma1": torch.ones(16)}
    )
    env.fails(env.convert_args(env.save_pth({"model": clash}, "clash.pth")), "Two checkpoint keys map to")
    env.fails(env.convert_args(env.save_pth({"model": {}}, "empty.pth"), config=False), "Not an InternImage state dict")
    env.fails(
        env.convert_args(env.save_pth({"fc.weight": torch.ones(2, 2)}, "other.pth"), config=False),
        "Not an InternImage state dict",
    )
    env.fails(env.convert_args(env.ckpt, "--use-ema"), "has no 'model_ema' entry")


# ------------------------------------------------------------------------------------------------ tensor values
BAD_VALUES = {
    "nan": (lambda t: t.index_fill(0, torch.tensor([0]), float("nan")), "holds 16 NaN values"),
    "inf": (lambda t: t.index_fill(0, torch.tensor([1]), float("inf")), "holds 16 Inf values"),
    "neg-inf-and-nan": (lambda t: torch.where(t > 0, float("-inf"), float("nan")), "NaN and Inf values"),
    "complex": (lambda t: t.to(torch.complex64), "is complex (torch.complex64)"),
    "int": (lambda t: t.round().to(torch.int32), "has dtype torch.int32"),
    "bool": (lambda t: t > 0, "has dtype torch.bool"),
    "0-d": (lambda t: torch.tensor(1.0), "is a 0-d scalar"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_tensor_values_are_named(env, case):
    make, expected = BAD_VALUES[case]
    state = env.state()
    state[WEIGHT] = make(state[WEIGHT])
    env.fails(env.convert_args(env.save_pth({"model": state})), f"tensor '{WEIGHT}'", expected)


def test_zero_d_detection_weight_is_one_line(env):
    state = env.state()
    state["patch_embed.conv2.weight"] = torch.tensor(0.5)  # once an IndexError in variant detection
    env.fails(
        env.convert_args(env.save_pth({"model": state}), config=False),
        "tensor 'patch_embed.conv2.weight' is a 0-d scalar",
    )


def test_float_batch_norm_counter_is_refused(env):
    state = env.state()
    state["conv_head.1.0.num_batches_tracked"] = torch.tensor(3.0)
    env.fails(env.convert_args(env.save_pth({"model": state})), "num_batches_tracked", "should be one integer")


def test_nan_in_a_remote_code_folder(env):
    folder = remote_code_copy(env)
    tensors = load_file(folder / "model.safetensors")
    key = next(k for k, v in tensors.items() if v.is_floating_point() and v.ndim == 2)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, folder / "model.safetensors")
    env.fails(["convert", str(folder), str(env.out)], f"tensor '{key}' holds 1 NaN value")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_other_float_dtypes_convert(env, dtype):
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in env.state().items()}
    env.succeeds(env.convert_args(env.save_pth({"model": state})))
    assert {t.dtype for t in load_file(env.out / "model.safetensors").values()} <= {torch.float32, torch.int64}


# ------------------------------------------------------------------------------------------------ configs, labels
BAD_CONFIGS = {
    "list": ("[1, 2, 3]", "holds a JSON list; it must be a JSON object"),
    "string": ('"t"', "holds a JSON string"),
    "null": ("null", "holds a JSON null"),
    "invalid": ('{"channels": 16,', "is not a readable JSON file"),
    "not-utf8": (b"\xff\xfe{}", "is not a readable JSON file"),
    "wrong-type": ('{"depths": "abc"}', "is not a valid InternImage configuration"),
    "wrong-value": ('{"channels": -3}', "got -3"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_official_configs(env, case):
    text, expected = BAD_CONFIGS[case]
    config = env.write("config.json", text)
    env.fails(["convert", str(env.ckpt), str(env.out), "--official-config", str(config)], "config.json", expected)


def test_official_config_missing_or_a_folder(env):
    env.fails(
        ["convert", str(env.ckpt), str(env.out), "--official-config", str(env.inputs / "none.json")],
        "none.json is not a readable JSON file",
    )
    env.fails(
        ["convert", str(env.ckpt), str(env.out), "--official-config", str(env.inputs)], "is not a readable JSON file"
    )


BAD_LABELS = {
    "invalid-json": ("labels.json", '["a", "b"', "not valid JSON"),
    "non-int-keys": ("labels.json", '{"cat": "dog"}', "keys must be class indices"),
    "number": ("labels.json", "7", "not a int"),
    "list-of-objects": ("labels.json", json.dumps([{"name": str(i)} for i in range(10)]), "must be strings"),
    "json-wrong-count": ("labels.json", json.dumps(["a", "b"]), "has 2 names; the head has 10 classes"),
    "txt-wrong-count": ("labels.txt", "a\nb\nc\n", "has 3 names; the head has 10 classes"),
    "empty-txt": ("labels.txt", "", "has 0 names"),
    "not-utf8": ("labels.txt", b"\xff\xfe\xfa\n" * 10, "not a UTF-8 text file"),
}


@pytest.mark.parametrize("case", list(BAD_LABELS))
def test_bad_label_files_name_the_file(env, case):
    name, data, expected = BAD_LABELS[case]
    labels = env.write(name, data)
    env.fails(env.convert_args(env.ckpt, "--labels", labels), f"--labels {labels}", expected)


def test_labels_missing_or_a_folder(env):
    env.fails(
        env.convert_args(env.ckpt, "--labels", env.inputs / "none.txt"),
        "none.txt: not 'auto'",
        "No such file or directory",
    )
    env.fails(env.convert_args(env.ckpt, "--labels", env.inputs), "a readable file")


def test_other_bad_options(env):
    env.fails(env.convert_args(env.ckpt, "--image-size", "16"), "--image-size 16: InternImage needs at least 32")
    env.fails(env.convert_args(env.ckpt, "--release", "internimage-zz"), "Unknown official release")
    env.fails(["convert", str(env.ckpt), str(env.out), "--variant", "zz"], "Unknown variant 'zz'")
    broken = env.write("expected.safetensors", b"\x00" * 20)
    env.fails(env.convert_args(env.ckpt, "--expected", broken), "--expected", "is not a readable safetensors file")
    partial = env.inputs / "partial.safetensors"
    save_file({"pixel_values": torch.zeros(1, 3, 32, 32)}, partial)
    env.fails(env.convert_args(env.ckpt, "--expected", partial), "lacks logits")


# ------------------------------------------------------------------------------------------------ output locations
def test_output_under_a_file(env):
    blocker = env.work / "file"
    blocker.write_text("x")
    env.fails(
        ["convert", str(env.ckpt), str(blocker / "out"), "--official-config", str(env.config)],
        f"cannot write into {blocker}",
    )


def test_read_only_output_folder(env, monkeypatch):
    parent = env.work / "readonly"
    parent.mkdir()
    if os.geteuid() == 0:  # root ignores permission bits: refuse the way the kernel would
        import tempfile

        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile, "mkdtemp", denied)
    else:
        parent.chmod(0o555)
    try:
        env.fails(
            ["convert", str(env.ckpt), str(parent / "out"), "--official-config", str(env.config)],
            f"cannot write into {parent}: Permission denied",
        )
    finally:
        parent.chmod(0o755)


def test_existing_output_without_overwrite(env):
    env.out.mkdir()
    (env.out / "mine.txt").write_text("keep")
    env.fails(env.convert_args(env.ckpt), "already exists; choose another folder or pass --overwrite")
    (env.work / "afile").write_text("keep")
    env.fails(
        ["convert", str(env.ckpt), str(env.work / "afile"), "--official-config", str(env.config)], "already exists"
    )
    manifest = env.write(
        "m.json",
        json.dumps({"entries": [{"name": "out", "source": str(env.ckpt), "official_config": str(env.config)}]}),
    )
    before = listing(env.work)
    assert cli_main(["convert-all", str(manifest), "--output-root", str(env.work)]) == 1
    out, err = stderr_lines(env.capsys)
    assert "already exists" in out and "1 of 1 failed: out" in err[-1]
    assert listing(env.work) == before and (env.out / "mine.txt").read_text() == "keep"


def test_overwrite_replaces_and_leaves_no_debris(env):
    env.out.mkdir()
    (env.out / "stale.txt").write_text("old")
    env.succeeds(env.convert_args(env.ckpt, "--overwrite"))
    assert not (env.out / "stale.txt").exists()


def test_nested_new_output(env):
    out = env.work / "a" / "b" / "out"
    env.succeeds(["convert", str(env.ckpt), str(out), "--official-config", str(env.config)], out=out)


# ------------------------------------------------------------------------------------------------ staging debris
def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_debris_of_dead_processes_is_swept_and_an_aside_output_restored(env):
    host = _host_tag()
    pid = dead_pid()
    new = env.work / f".internimage-hf-new-{pid}-{host}-abcd1234-out"
    new.mkdir()
    (new / "model.safetensors").write_bytes(b"partial")
    aside = env.work / f".internimage-hf-old-{pid}-{host}-efgh5678-kept"
    (aside / "kept").mkdir(parents=True)
    (aside / "kept" / "config.json").write_text("{}")
    alive = env.work / f".internimage-hf-new-{os.getpid()}-{host}-ijkl9012-busy"  # a conversion still running
    alive.mkdir()
    elsewhere = env.work / f".internimage-hf-new-{pid}-00000000-mnop3456-remote"  # another host's
    elsewhere.mkdir()
    assert cli_main(env.convert_args(env.ckpt)) == 0
    stderr_lines(env.capsys)
    assert sorted(p.name for p in env.work.iterdir()) == sorted([alive.name, elsewhere.name, "kept", "out"])
    assert (env.work / "kept" / "config.json").read_text() == "{}"  # the killed --overwrite's old output is back
    assert sweep_staging(env.work) == []  # the live and the foreign ones stay


KILLER = textwrap.dedent(r"""
    import json, os, random, select, signal, sys, time
    from pathlib import Path

    import torch

    torch.set_num_threads(1)
    from safetensors.torch import load_file

    import internimage_hf.conversion.output as output_module
    from internimage_hf.cli import main
    from internimage_hf.modeling_internimage import InternImageForImageClassification

    source, config, parent = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    points = sys.argv[4].split(",")
    out = parent / "out"
    args = ["convert", source, str(out), "--official-config", config, "--overwrite"]
    FILES = ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    random.seed(0)


    def stop_here(fd):
        os.write(fd, b"x")
        time.sleep(60)


    def hook(point, fd):
        if point == "save":
            original = InternImageForImageClassification.save_pretrained

            def save(self, folder, **kwargs):
                original(self, folder, **kwargs)
                stop_here(fd)

            InternImageForImageClassification.save_pretrained = save
        elif point == "verify":
            original_check = output_module.check_saved_weights

            def check(folder, model):
                count = original_check(folder, model)
                stop_here(fd)
                return count

            output_module.check_saved_weights = check
        elif point == "swap":
            original_replace = os.replace

            def replace(src, dst):
                original_replace(src, dst)
                if Path(dst).parent.name.startswith(".internimage-hf-old-"):
                    stop_here(fd)  # the old output is aside, the new one not yet in place

            os.replace = replace


    def state():
        if not out.exists():
            return "absent"
        names = sorted(p.name for p in out.iterdir())
        if [n for n in names if n != "previous-run.txt"] != FILES:
            return "partial: " + ",".join(names)
        json.loads((out / "config.json").read_text())
        load_file(out / "model.safetensors")
        return "complete"


    report = []
    duration = 0.5  # of a whole conversion: measured by the "none" round
    for point in points:
        read_fd, write_fd = os.pipe()
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            try:
                hook(point, write_fd)
                os._exit(main(args))
            except BaseException:
                os._exit(3)
        os.close(write_fd)
        if point == "none":
            code = os.waitpid(pid, 0)[1]
            duration = time.perf_counter() - start
            (out / "previous-run.txt").write_text("from the run before the kills")
        else:
            if point == "random":  # anywhere in the conversion, saving included
                time.sleep(random.uniform(0.2, 1.0) * duration)
            else:
                select.select([read_fd], [], [], 60)
            os.kill(pid, signal.SIGKILL)
            code = os.waitpid(pid, 0)[1]
        os.close(read_fd)
        debris = sorted(p.name for p in parent.iterdir() if p.name.startswith("."))
        entry = {"point": point, "status": code, "out": state(), "debris": len(debris),
                 "seconds": round(time.perf_counter() - start, 3)}
        if point == "swap":
            output_module.sweep_staging(parent)  # what the next save into this folder does first
            entry["after_sweep"] = state()
            entry["restored_old"] = (out / "previous-run.txt").exists()
        report.append(entry)
    final = main(args)
    print(json.dumps({"rounds": report, "final": final, "listing": sorted(p.name for p in parent.iterdir()),
                      "out": state()}))
""")


def test_kill_9_during_save_leaves_no_partial_output_and_no_debris(env):
    points = ["none", "save", "verify", "swap"] + ["random"] * 6 + ["save"]
    result = subprocess.run(
        [sys.executable, "-c", KILLER, str(env.ckpt), str(env.config), str(env.work), ",".join(points)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    rounds = report["rounds"]
    assert [r["point"] for r in rounds] == points
    for entry in rounds:
        if entry["point"] == "none":
            assert entry["out"] == "complete" and entry["status"] == 0
        elif entry["point"] == "swap":  # killed between the two renames: output aside, then put back
            assert entry["out"] == "absent" and entry["debris"] >= 1, entry
            assert entry["after_sweep"] == "complete" and entry["restored_old"], entry
        else:  # never a partial output: the old one is still there, complete (or the new one already is)
            assert entry["out"] == "complete", entry
            assert os.WIFSIGNALED(entry["status"]) or os.WEXITSTATUS(entry["status"]) == 0, entry
            if entry["point"] in ("save", "verify"):
                assert entry["debris"] >= 1, entry  # killed mid-save: staging debris exists
    # the next successful conversion removed every staging folder of the killed runs
    assert report["final"] == 0 and report["out"] == "complete"
    assert report["listing"] == ["out"], report["listing"]
