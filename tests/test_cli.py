"""The `internimage-hf` command itself: fast --help without torch, one-line errors for missing extras, build-kernels
progress and its built/reused report."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from internimage_hf import cli
from internimage_hf.cli import main as cli_main

COMMANDS = ([], ["convert"], ["convert-all"], ["build-kernels"], ["demo"])


def console_script() -> Path:
    """The installed `internimage-hf` script (a Python script; pyenv shims are skipped)."""
    for candidate in (Path(sys.executable).parent / "internimage-hf", shutil.which("internimage-hf")):
        if candidate and Path(candidate).is_file():
            head = Path(candidate).read_bytes()[:200]
            if head.startswith(b"#!") and b"python" in head.splitlines()[0]:
                return Path(candidate)
    pytest.skip("the internimage-hf console script is not installed next to this interpreter")


# Runs the console script as its own `__main__` (what the shell does), then reports which heavy modules it loaded.
PROBE = """
import json, runpy, sys, time
start = time.perf_counter()
sys.argv = sys.argv[1:]  # [script, command..., --help], as the shell would pass them
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "seconds": time.perf_counter() - start,
                  "heavy": sorted(m for m in ("torch", "transformers", "numpy", "safetensors") if m in sys.modules)}))
"""


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "top")
def test_help_answers_quickly_without_torch(command):
    script = console_script()
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(script), *command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    wall = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["code"] in (0, None)
    assert "usage: internimage-hf" in result.stdout
    assert report["heavy"] == [], report  # argparse only: no torch, transformers, numpy
    assert report["seconds"] < 0.5, report  # typically 0.01-0.05 s
    assert wall < 5, wall  # interpreter start included; generous for a loaded 2-core machine


def test_module_entry_point_help_is_light():
    probe = (
        "import runpy, sys\nsys.argv = ['internimage_hf', '--help']\ntry:\n"
        "    runpy.run_module('internimage_hf', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', 'torch' in sys.modules)"
    )
    # `python -m internimage_hf` is recognised from the interpreter's own command line, so run it for real
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "internimage_hf", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and "usage: internimage-hf" in result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "transformers" not in imported
    # any other program importing the package (here `-c` with runpy) gets the eager import and registration
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert "HEAVY True" in result.stdout


def test_import_registers_and_lazy_command_mode_loads_on_use():
    code = """
import runpy, sys
sys.argv = ["internimage-hf", "--help"]
# pretend to be the console script: the package defers its heavy imports
main = type(sys)("__main__"); main.__file__ = "/somewhere/bin/internimage-hf"; sys.modules["__main__"] = main
import internimage_hf
print("deferred", "torch" not in sys.modules and not internimage_hf._loaded)
config = internimage_hf.InternImageConfig  # first use of a public name loads and registers
from transformers import CONFIG_MAPPING, AutoModelForImageClassification
print("registered", "internimage" in CONFIG_MAPPING and internimage_hf._loaded)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert "deferred True" in result.stdout and "registered True" in result.stdout, result.stderr[-2000:]
    eager_code = (
        "import internimage_hf\nfrom transformers import CONFIG_MAPPING\n"
        "print('registered', 'internimage' in CONFIG_MAPPING)"
    )
    eager = subprocess.run([sys.executable, "-c", eager_code], capture_output=True, text=True, timeout=120, check=False)
    assert "registered True" in eager.stdout, eager.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ missing extras
def one_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_demo_without_the_train_extra_says_which_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # find_spec -> None, import -> ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli_main(["demo", "--quick", "--output-dir", str(tmp_path / "demo")]) == 1
    line = one_line(capsys)
    assert line == (
        "internimage-hf demo: error: internimage-hf demo needs scikit-learn, matplotlib, which are not "
        "installed: pip install 'internimage-hf[train]'"
    )
    assert not (tmp_path / "demo").exists()


def test_demo_data_needs_no_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    from internimage_hf.demo import load_digits_dataset

    splits = load_digits_dataset()
    assert len(splits["train"]) == 1437 and len(splits["test"]) == 360


def test_module_not_found_inside_a_command_names_the_extra(monkeypatch, capsys):
    import internimage_hf.demo

    def run_demo(args):
        raise ModuleNotFoundError("No module named 'accelerate'", name="accelerate")

    monkeypatch.setattr(internimage_hf.demo, "run_demo", run_demo)
    assert cli_main(["demo", "--quick"]) == 1
    assert one_line(capsys).endswith("needs accelerate, which is not installed: pip install 'internimage-hf[train]'")


# ------------------------------------------------------------------------------------------------ build-kernels
def fake_build(steps):
    def build_kernels(cache_dir=None, cuda=None, verbose=False, force=False, progress=None):
        for step, seconds in steps:
            progress(step, seconds)
        return Path("/cache/build/torch-cpu")

    return build_kernels


def test_build_kernels_says_reused(monkeypatch, capsys):
    from internimage_hf.ops import build

    monkeypatch.setattr(build, "build_kernels", fake_build([("reuse", 0.0)]))
    assert cli_main(["build-kernels", "--no-cuda"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("Reused the up-to-date DCNv3 kernel build in /cache/build/torch-cpu")
    assert "Built" not in captured.out and captured.err == ""


def test_build_kernels_shows_progress_and_says_built(monkeypatch, capsys):
    from internimage_hf.ops import build

    steps = [("compile", 0.0)] + [("compile", float(s)) for s in range(1, 40)] + [("smoke-test", 0.0), ("install", 0.0)]
    monkeypatch.setattr(build, "build_kernels", fake_build(steps))
    monkeypatch.setattr(cli.shutil, "which", lambda name: "/usr/bin/ninja")
    assert cli_main(["build-kernels"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("Built the DCNv3 kernel in ") and "/cache/build/torch-cpu" in captured.out
    assert captured.err.splitlines() == [
        "compiling the DCNv3 kernel (about a minute)...",
        "  still compiling: 15 s",
        "  still compiling: 30 s",
        "testing the new build...",
        "installing the build...",
    ]


def test_build_kernels_without_ninja_names_the_extra(monkeypatch, capsys):
    from internimage_hf.ops import build

    monkeypatch.setattr(build, "build_kernels", fake_build([("compile", 0.0)]))
    monkeypatch.setattr(cli.shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "ninja", None)
    assert cli_main(["build-kernels"]) == 1
    assert one_line(capsys) == (
        "internimage-hf build-kernels: error: compiling the DCNv3 kernel needs ninja, which is "
        "not installed: pip install 'internimage-hf[kernels]'"
    )


def test_build_runner_ticks_while_the_child_runs(tmp_path):
    from internimage_hf.ops.build import _run

    ticks = []
    out = _run(
        [sys.executable, "-c", "import time; time.sleep(1.2); print('done')"],
        False,
        "sleep",
        tmp_path / "log",
        tick=ticks.append,
        tick_seconds=0.2,
    )
    assert out.strip() == "done" and len(ticks) >= 3 and ticks == sorted(ticks)
