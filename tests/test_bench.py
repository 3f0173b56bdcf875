"""Keep the throughput benchmark script working (tiny configurations, a second or two)."""

from __future__ import annotations

import importlib.util
import json
import sys

from .conftest import REPO


def load_bench():
    spec = importlib.util.spec_from_file_location("throughput", REPO / "bench" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["throughput"] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def test_quick_tiny_run_writes_json_table_and_plot(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "result.json"
    code = bench.main(
        [
            "--quick",
            "--tiny",
            "--size",
            "64",
            "--impls",
            "reference",
            "free-op",
            "--batch",
            "1",
            "2",
            "--repeats",
            "1",
            "--json",
            str(out),
            "--plot",
            str(tmp_path / "plot.png"),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert {"device", "torch", "rows"} <= set(result)
    rows = result["rows"]
    assert {r["model"] for r in rows} == {"internimage-t", "flash-internimage-t", "convnext-t", "swin-t"}
    for row in rows:
        assert row["error"] is None, row
        assert row["img_per_s"] > 0 and row["peak_mem_mb"] >= 0
        assert set(row) >= {"model", "impl", "mode", "batch", "dtype", "img_per_s", "peak_mem_mb"}
    table = capsys.readouterr().out
    assert "× ConvNeXt-T" in table and "| convnext-t | - | inference | 1 | float32 |" in table
    assert "| internimage-t | free-op | inference | 1 | float32 |" in table
    assert "- internimage-t inference batch 1 float32: " not in table  # ratios are quoted for `compiled` rows only
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_same_run_ratios_and_the_free_op_bound():
    """The summary quotes compiled over the pure-PyTorch paths and the free-op ceiling; free-op really skips the op
    and puts it back afterwards."""
    import torch

    from internimage_hf.ops import DCNv3Core, use_reference

    bench = load_bench()
    rows = [
        {
            "model": "internimage-t",
            "impl": impl,
            "mode": "inference",
            "batch": 8,
            "dtype": "float32",
            "img_per_s": value,
        }
        for impl, value in (("compiled", 30.0), ("reference", 10.0), ("official", 8.0), ("free-op", 36.0))
    ]
    text = bench.impl_ratios({"rows": rows})
    assert "compiled / reference 3.00×" in text and "compiled / official 3.75×" in text
    assert "free-op / reference 3.60×" in text and "free-op / official 4.50×" in text
    forward = DCNv3Core.forward
    x = torch.randn(1, 4, 4, 8)
    with bench._free_dcnv3_op():
        # free-op models run their DCNv3 layers on the class forward (bench.prepare_internimage)
        assert use_reference(DCNv3Core())(x, None, None, 3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0, 0) is x
    assert DCNv3Core.forward is forward


def test_compile_section_ratios_and_inductor_options(monkeypatch):
    """--compile rows: inductor over its eager twin with the compile time; every model is compiled the way a user
    would, `fullgraph=True` with inductor's default options (freezing on)."""
    import torch

    bench = load_bench()
    row = {"model": "internimage-t", "impl": "compiled", "batch": 8, "dtype": "float32", "compile_s": None}
    rows = [
        {**row, "mode": "inference", "img_per_s": 10.0},
        {**row, "mode": "inference-inductor", "img_per_s": 12.0, "compile_s": 40.2},
        {**row, "model": "convnext-t", "impl": "-", "mode": "inference-inductor", "img_per_s": 15.0, "compile_s": 9.0},
    ]
    text = bench.compile_ratios({"rows": rows})
    assert (
        "- internimage-t (compiled) batch 8 float32: inductor / eager 1.20×, compile (first call, empty caches) 40 s"
        " (4.5× ConvNeXt-T's)" in text
    )
    assert "- convnext-t batch 8 float32: compile (first call, empty caches) 9 s\n" in text + "\n"

    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "freezing", False)  # compile_module sets it; restored after the test
    seen = []
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: seen.append((module, kwargs)))
    for name in ("internimage-t", "flash-internimage-t", "convnext-t"):
        bench.compile_module(name)
    assert seen == [(name, {"fullgraph": True}) for name in ("internimage-t", "flash-internimage-t", "convnext-t")]
    assert inductor_config.freezing is True


def test_compile_time_is_a_first_compile_in_empty_caches(monkeypatch, tmp_path):
    """The first call of an inductor case runs with TORCHINDUCTOR_CACHE_DIR on a new, empty directory (no cache hit
    from earlier runs), removed afterwards, and the user's setting comes back."""
    import os

    import torch

    bench = load_bench()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "user-cache"))
    seen = []

    class Case:
        def step(self):
            cache = os.environ["TORCHINDUCTOR_CACHE_DIR"]
            seen.append((cache, os.path.isdir(cache), os.listdir(cache)))

    seconds = bench.cold_compile_seconds(Case(), torch.device("cpu"))
    assert seconds >= 0 and len(seen) == 1
    cache, existed, content = seen[0]
    assert cache != str(tmp_path / "user-cache") and existed and content == []
    assert not os.path.exists(cache)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "user-cache")


def test_inductor_warm_up_compiles_in_a_cache_of_its_own(monkeypatch, tmp_path):
    """The untimed warm-up compile (inductor's one-time costs) leaves nothing in the user's inductor cache."""
    import os

    import torch

    bench = load_bench()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    caches = []

    def compile_module(module):
        def call(x):
            caches.append(os.environ["TORCHINDUCTOR_CACHE_DIR"])
            return module(x)

        return call

    monkeypatch.setattr(bench, "compile_module", compile_module)
    bench.warm_up_inductor(torch.device("cpu"))
    assert len(caches) == 1 and caches[0] != str(tmp_path) and not os.path.exists(caches[0])
    assert list(tmp_path.iterdir()) == []


def test_cpu_description_names_libraries_held_below_the_cpu(monkeypatch):
    """A run with oneDNN or MKL held to an older instruction set (an AVX2 machine emulated) says so in its device
    line, which every table and JSON carries."""
    bench = load_bench()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("MKL_ENABLE_INSTRUCTIONS", raising=False)
    assert "ONEDNN_MAX_CPU_ISA" not in bench.cpu_description()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    assert "ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2" in bench.cpu_description()


def test_linear_bench_times_every_gemm_shape_of_a_model(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_linear", REPO / "bench" / "bench_linear.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "linear.json"
    code = bench.main(
        ["--variant", "tiny", "--image-size", "64", "--batch", "1", "--repeats", "1", "--min-time", "0.001"]
        + ["--json", str(out)]
    )
    assert code == 0
    result = json.loads(out.read_text())
    roles = {role for row in result["rows"] for role in row["roles"]}
    assert {"input_proj", "offset", "mask", "output_proj", "fc1", "fc2"} <= roles
    for row in result["rows"]:
        assert row["gflops"]["ours"] > 0 and row["gflops"]["torch"] > 0 and row["ours_over_best"] > 0
    assert result["merged_offset_mask"], "a DCNv3 model's offset and mask GEMMs are timed merged too"
    assert "GFLOP/s" in capsys.readouterr().out
