"""The scripts in examples/ run as written (small defaults), including fine-tuning on 2 CPU processes."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from internimage_hf.training import make_synthetic_image_folder

from .conftest import FIXTURES, REPO

EXAMPLES = REPO / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _descendants(pid: int) -> list[int]:
    """Every process below PID (Linux /proc): torchrun starts its workers in sessions of their own, so killing its
    process group leaves them running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def run_script(args: list[str], tmp_path: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run `python ARGS` offline in tmp_path. Output goes to files, not pipes (a stuck worker cannot hold a pipe
    open past its launcher); on a timeout every process it started gets SIGABRT (faulthandler prints where each one
    was), then SIGKILL, and the test fails with that output."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_CACHE=str(tmp_path / "datasets-cache"),
        OMP_NUM_THREADS="1",
        PYTHONFAULTHANDLER="1",
    )
    out_path, err_path = tmp_path / "script-stdout.txt", tmp_path / "script-stderr.txt"
    with out_path.open("w") as out, err_path.open("w") as err:
        process = subprocess.Popen([sys.executable, *args], cwd=tmp_path, env=env, stdout=out, stderr=err)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            tree = [*_descendants(process.pid), process.pid]
            for sig in (signal.SIGABRT, signal.SIGKILL):
                for pid in tree:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                time.sleep(3)
            process.wait()
            pytest.fail(f"timed out after {timeout} s:\n{out_path.read_text()[-3000:]}\n{err_path.read_text()[-8000:]}")
    stdout, stderr = out_path.read_text(), err_path.read_text()
    assert process.returncode == 0, stdout[-3000:] + stderr[-5000:]
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def logged_losses(output_dir: Path) -> list[float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def test_finetune_on_two_cpu_processes_with_torchrun(tmp_path):
    data = make_synthetic_image_folder(tmp_path / "images", images_per_class=20, size=40)
    out = tmp_path / "run"
    run_script(
        [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(EXAMPLES / "finetune.py"),
            "--data",
            str(data),
            "--output-dir",
            str(out),
            "--epochs",
            "4",
            "--batch-size",
            "4",
            "--val-fraction",
            "0.2",
        ],
        tmp_path,
    )
    results = json.loads((out / "finetune_results.json").read_text())
    assert results["world_size"] == 2
    losses = logged_losses(out)
    # 32 training images, 2 processes x 4 per step: 4 steps per epoch; the loss is averaged over both ranks.
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4, losses
    # Exactly one checkpoint, written once (by rank 0): no per-rank copies, no intermediate checkpoint folders.
    assert [p.relative_to(out) for p in out.rglob("*.safetensors")] == [Path("model.safetensors")]
    assert not list(out.glob("checkpoint-*"))
    assert (out / "preprocessor_config.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "green", "1": "red"}  # imagefolder: class folders in sorted order


FSDP2_SCRIPT = """
import gc, json, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from internimage_hf import InternImageConfig, InternImageForImageClassification
from internimage_hf.modeling_internimage import InternImageLayer
from internimage_hf.training import layer_decay_param_groups

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = InternImageForImageClassification(InternImageConfig(channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8],
                                                            num_labels=2))
for module in model.modules():  # what examples/accelerate/fsdp.yaml asks accelerate to do
    if isinstance(module, InternImageLayer):
        fully_shard(module)
fully_shard(model)
groups = layer_decay_param_groups(model, 2e-3, 0.05, layer_decay=0.9)
optimizer = torch.optim.AdamW(groups)
torch.manual_seed(1 + rank)
pixel_values, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 2, (4,))
losses = []
for _ in range(6):
    loss = model(pixel_values=pixel_values, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    losses.append(loss.item())
record = {"losses": losses, "sharded": type(model.classifier.weight).__name__,
          "scales": sorted({round(g["lr_scale"], 6) for g in groups})}
with open(sys.argv[1] + f"/rank{rank}.json", "w") as f:
    json.dump(record, f)
del model, optimizer, groups  # what holds the process group goes first (examples/finetune.py, end_distributed)
gc.collect()
dist.destroy_process_group()
"""


def test_fsdp2_shards_internimage_layers_and_keeps_layer_decay(tmp_path):
    """The sharding examples/accelerate/fsdp.yaml configures (one unit per InternImageLayer), on 2 CPU processes."""
    script = tmp_path / "fsdp2.py"
    script.write_text(FSDP2_SCRIPT)
    run_script(
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path)], tmp_path
    )
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["sharded"] == "DTensor"
        assert record["scales"] == [round(0.9**d, 6) for d in (4, 3, 2, 1, 0)]
        assert record["losses"][-1] < record["losses"][0]


def test_finetune_options_single_process(tmp_path):
    """Head replacement from a saved folder, layer decay, DCN LR, drop path, checkpointing and bf16 autocast."""
    from internimage_hf import InternImageConfig, InternImageForImageClassification

    pretrained = tmp_path / "pretrained"
    InternImageForImageClassification(
        InternImageConfig(channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8], num_labels=10, image_size=32)
    ).save_pretrained(pretrained)
    data = make_synthetic_image_folder(
        tmp_path / "images", images_per_class=8, size=32, classes=("red", "green", "blue")
    )
    out = tmp_path / "run"
    run_script(
        [
            str(EXAMPLES / "finetune.py"),
            "--data",
            str(data),
            "--model",
            str(pretrained),
            "--output-dir",
            str(out),
            "--max-steps",
            "3",
            "--batch-size",
            "4",
            "--layer-decay",
            "0.8",
            "--dcn-lr-mul",
            "0.1",
            "--drop-path",
            "0.1",
            "--gradient-checkpointing",
            "--bf16",
        ],
        tmp_path,
    )
    config = json.loads((out / "config.json").read_text())
    assert len(config["id2label"]) == 3  # the 10-class head was replaced
    assert config["drop_path_rate"] == 0.1
    assert len(logged_losses(out)) == 3
    args = json.loads((out / "finetune_results.json").read_text())
    assert args["labels"] == ["blue", "green", "red"]


def test_classify_image_example(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no outputs/demo/model here: the script falls back to a random tiny model
    assert load_example("classify_image").main(["--digit", "3", "--top-k", "2"]) == 0
    printed = capsys.readouterr().out
    assert "a drawn 3:" in printed and len(printed.strip().splitlines()) >= 3


def test_extract_features_example(capsys):
    assert load_example("extract_features").main(["--out-features", "stage1", "stage4"]) == 0
    printed = capsys.readouterr().out
    assert "stage1  (1, 16, 8, 8)" in printed and "stage4  (1, 128, 1, 1)" in printed
    assert "pooled embedding (1, 192)" in printed


def test_segmentation_example(tmp_path, capsys):
    assert load_example("segmentation").main(["--steps", "3", "--output-dir", str(tmp_path / "upernet")]) == 0
    printed = capsys.readouterr().out
    assert "logits (4, 4, 64, 64)" in printed
    losses = [float(line.rsplit(" ", 1)[1]) for line in printed.splitlines() if line.startswith("step ")]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert (tmp_path / "upernet" / "model.safetensors").is_file()


def test_detection_example(capsys):
    assert load_example("detection").main(["--steps", "2"]) == 0
    assert "pred_boxes (4, 10, 4)" in capsys.readouterr().out


def test_export_onnx_example(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    assert load_example("export_onnx").main(["--output", str(tmp_path / "m.onnx"), "--exporter", "torchscript"]) == 0
    printed = capsys.readouterr().out
    errors = [float(line.rsplit(" ", 1)[1]) for line in printed.splitlines() if "max relative error" in line]
    assert len(errors) == 2 and max(errors) < 1e-4


def test_convert_and_push_example_dry_run_and_push(tmp_path, capsys, monkeypatch):
    source = FIXTURES / "tiny_t"
    if not source.is_dir():
        pytest.skip(f"official fixtures not found at {FIXTURES}")
    example = load_example("convert_and_push")
    out = tmp_path / "converted"
    args = [str(source / "checkpoint.pth"), str(out), "--official-config", str(source / "official_config.json")]
    assert example.main(args) == 0
    printed = capsys.readouterr().out
    assert "dry run" in printed and "model.safetensors" in printed
    assert {p.name for p in out.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "README.md",
    }

    calls = []

    class FakeApi:  # records what would go to the Hub (no network in tests)
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs["repo_id"], kwargs))
            return type("Commit", (), {"commit_url": "https://huggingface.co/someone/tiny-internimage/commit/0"})()

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert example.main(args + ["--overwrite", "--push-to-hub", "someone/tiny-internimage"]) == 0
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[1][2]["folder_path"] == str(out) and calls[1][1] == "someone/tiny-internimage"
    assert "someone/tiny-internimage" in (out / "README.md").read_text()


def test_accelerate_configs_parse_and_name_the_fsdp_unit():
    yaml = pytest.importorskip("yaml")
    from internimage_hf import InternImagePreTrainedModel, modeling_internimage

    ddp = yaml.safe_load((EXAMPLES / "accelerate" / "ddp.yaml").read_text())
    fsdp = yaml.safe_load((EXAMPLES / "accelerate" / "fsdp.yaml").read_text())
    assert ddp["distributed_type"] == "MULTI_GPU" and fsdp["distributed_type"] == "FSDP"
    layer = fsdp["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"]
    assert layer in InternImagePreTrainedModel._no_split_modules and hasattr(modeling_internimage, layer)
    from accelerate.commands.config.config_args import load_config_from_file

    for name in ("ddp.yaml", "fsdp.yaml"):
        assert load_config_from_file(str(EXAMPLES / "accelerate" / name)).num_processes == 8
