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
    code = bench.main(["--quick", "--tiny", "--size", "64", "--impls", "reference", "--batch", "1", "2",
                       "--repeats", "1", "--json", str(out), "--plot", str(tmp_path / "plot.png")])
    assert code == 0
    result = json.loads(out.read_text())
    assert {"device", "torch", "rows"} <= set(result)
    rows = result["rows"]
    assert {r["model"] for r in rows} == {"internimage-t", "convnext-t", "swin-t"}
    for row in rows:
        assert row["error"] is None, row
        assert row["img_per_s"] > 0 and row["peak_mem_mb"] >= 0
        assert set(row) >= {"model", "impl", "mode", "batch", "dtype", "img_per_s", "peak_mem_mb"}
    table = capsys.readouterr().out
    assert "× ConvNeXt-T" in table and "| convnext-t | - | inference | 1 | float32 |" in table
    assert (tmp_path / "plot.png").stat().st_size > 1000
