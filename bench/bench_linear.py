"""The GEMMs of an InternImage forward on this CPU: which path is fastest per shape, and how close ours comes.

Every Linear of the model (shapes recorded from a real forward: input_proj, offset, mask, output_proj, fc1, fc2, the
head) at the benchmark batch sizes, float32 inference, each shape timed on the paths torch has for it, interleaved
(each repeat runs every path once, so machine drift hits all alike), medians:

- torch:   F.linear, what a plain nn.Linear runs (MKL's sgemm through addmm on x86 builds);
- oneDNN:  torch.ops.mkldnn._linear_pointwise, unpacked weight (what the kernelized CPU layers call);
- packed:  MKL's sgemm on a pre-packed weight (torch.ops.mkl._mkl_linear, what inductor's freezing emits);
- ours:    internimage_hf.ops.cpu_layers.linear, the path a kernelized model takes for this call.

The table gives GFLOP/s per path, `ours / best` per shape, and totals per forward weighted by how often each shape
occurs (issue 16, goal 1: ours >= 85% of the best path on every machine). "packed" needs a weight packed ahead of
time, so it is a ceiling for frozen graphs, not an option for eager layers that read the weight per call.

For DCNv3 models the offset and mask projections (same input) are also timed as one GEMM on concatenated weights
(issue 16, goal 3), concatenated ahead of time, i.e. the most a merged Linear could gain.

    python bench/bench_linear.py                          # InternImage-T, batch 1 and 8
    python bench/bench_linear.py --variant flash_t --batch 8 --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from throughput import cpu_description  # noqa: E402

from internimage_hf import InternImageConfig, InternImageModel  # noqa: E402
from internimage_hf.ops.cpu_layers import linear as our_linear  # noqa: E402


def linear_shapes(variant: str, image_size: int) -> list[dict]:
    """(tokens at batch 1, in, out, count, role) of every Linear call in one forward of `variant`, in call order
    of first appearance; offset/mask pairs of one layer are marked for the merged-GEMM rows."""
    config = InternImageConfig.from_preset(variant)
    model = InternImageModel(config).eval()
    calls: list[tuple[int, int, int, str]] = []

    def record(module, args, output):
        x = args[0]
        calls.append((x.numel() // x.shape[-1], module.in_features, module.out_features, module._bench_role))

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module._bench_role = name.rsplit(".", 1)[-1]
            module.register_forward_hook(record)
    with torch.no_grad():
        model(torch.randn(1, 3, image_size, image_size))
    shapes: dict[tuple[int, int, int], dict] = {}
    for tokens, k, n, role in calls:
        entry = shapes.setdefault((tokens, k, n), {"tokens": tokens, "k": k, "n": n, "count": 0, "roles": set()})
        entry["count"] += 1
        entry["roles"].add(role)
    return list(shapes.values())


def candidates(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> dict:
    paths = {
        "torch": lambda: F.linear(x, weight, bias),
        "ours": lambda: our_linear(x, weight, bias),
    }
    onednn = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if onednn is not None:
        paths["oneDNN"] = lambda: onednn(x, weight, bias, "none", [], "")
    mkl = getattr(torch.ops, "mkl", None)
    if torch._C.has_mkl and hasattr(mkl, "_mkl_linear"):
        rows = x.shape[0]
        packed = mkl._mkl_reorder_linear_weight(weight, rows)
        paths["packed"] = lambda: mkl._mkl_linear(x, packed, weight, bias, rows)
    return paths


def time_paths(paths: dict, repeats: int, min_time: float) -> dict:
    """Median seconds per call of each path, interleaved; `inner` calls per sample so a sample lasts >= min_time."""
    for fn in paths.values():  # warm-up (oneDNN primitive caches, page faults)
        fn()
        fn()
    start = time.perf_counter()
    next(iter(paths.values()))()
    inner = max(1, int(min_time / max(time.perf_counter() - start, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(values) for name, values in samples.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="t", help="config preset: tiny or a variant (default: t, InternImage-T)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--min-time", type=float, default=0.02, help="seconds per timed sample")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = linear_shapes(args.variant, args.image_size)
    print(
        f"Linears of {args.variant} at {args.image_size}², float32 inference on {cpu_description()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}\n"
    )
    rows, merged_rows = [], []
    for batch in args.batch:
        print(
            f"| batch | M | K | N | × per forward | layers | {' | '.join(['torch', 'oneDNN', 'packed', 'ours'])} "
            "GFLOP/s | ours / best |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        totals: dict[str, float] = {}
        best_total = 0.0
        for shape in shapes:
            m, k, n = shape["tokens"] * batch, shape["k"], shape["n"]
            x, weight, bias = torch.randn(m, k), torch.randn(n, k) / k**0.5, torch.randn(n)
            flops = 2.0 * m * k * n
            seconds = time_paths(candidates(x, weight, bias), args.repeats, args.min_time)
            best = min(v for name, v in seconds.items() if name != "ours")
            for name, value in seconds.items():
                totals[name] = totals.get(name, 0.0) + value * shape["count"]
            best_total += best * shape["count"]
            gflops = {name: flops / value / 1e9 for name, value in seconds.items()}
            cells = " | ".join(
                f"{gflops[name]:.0f}" if name in gflops else "-" for name in ("torch", "oneDNN", "packed", "ours")
            )
            roles = ", ".join(sorted(shape["roles"]))
            print(
                f"| {batch} | {m} | {k} | {n} | {shape['count']} | {roles} | {cells} | {best / seconds['ours']:.2f} |"
            )
            rows.append(
                {
                    "batch": batch,
                    "m": m,
                    "k": k,
                    "n": n,
                    "count": shape["count"],
                    "roles": sorted(shape["roles"]),
                    "gflops": gflops,
                    "ours_over_best": best / seconds["ours"],
                }
            )
        summary = ", ".join(f"{name} {value * 1e3:.1f} ms" for name, value in totals.items())
        print(
            f"\nbatch {batch}, all Linears of one forward: {summary}; best path per shape {best_total * 1e3:.1f} ms; "
            f"ours / best = {best_total / totals['ours']:.2f}\n"
        )
        merged_rows += merged_offset_mask(shapes, batch, args)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "cpu": cpu_description(),
                    "threads": torch.get_num_threads(),
                    "rows": rows,
                    "merged_offset_mask": merged_rows,
                },
                indent=1,
            )
            + "\n"
        )
    return 0


def pair_paths(x, wo, bo, wm, bm) -> dict:
    wc, bc = torch.cat([wo, wm]), torch.cat([bo, bm])
    return {
        "separate": lambda: (our_linear(x, wo, bo), our_linear(x, wm, bm)),
        "merged": lambda: our_linear(x, wc, bc),
    }


def merged_offset_mask(shapes: list[dict], batch: int, args) -> list[dict]:
    """offset (N = 2GP) and mask (N = GP) of one DCNv3 layer: two GEMMs (ours) against one on concatenated weights."""
    offsets = [s for s in shapes if s["roles"] == {"offset"}]
    masks = {(s["tokens"], s["k"]): s for s in shapes if s["roles"] == {"mask"}}
    pairs = [(o, masks[(o["tokens"], o["k"])]) for o in offsets if (o["tokens"], o["k"]) in masks]
    if not pairs:
        return []
    out, separate_total, merged_total = [], 0.0, 0.0
    for offset, mask in pairs:
        m, k = offset["tokens"] * batch, offset["k"]
        x = torch.randn(m, k)
        wo, bo = torch.randn(offset["n"], k) / k**0.5, torch.randn(offset["n"])
        wm, bm = torch.randn(mask["n"], k) / k**0.5, torch.randn(mask["n"])
        seconds = time_paths(pair_paths(x, wo, bo, wm, bm), args.repeats, args.min_time)
        separate_total += seconds["separate"] * offset["count"]
        merged_total += seconds["merged"] * offset["count"]
        out.append(
            {
                "batch": batch,
                "m": m,
                "k": k,
                "separate_ms": seconds["separate"] * 1e3,
                "merged_ms": seconds["merged"] * 1e3,
                "layers": offset["count"],
            }
        )
    detail = "; ".join(f"M {r['m']} K {r['k']}: {r['separate_ms']:.3f} / {r['merged_ms']:.3f} ms" for r in out)
    print(
        f"batch {batch}, offset + mask per DCNv3 layer, two GEMMs / one merged GEMM: {detail}; per forward "
        f"{separate_total * 1e3:.1f} / {merged_total * 1e3:.1f} ms (merged saves "
        f"{(separate_total - merged_total) / separate_total:.0%})\n"
    )
    return out


if __name__ == "__main__":
    raise SystemExit(main())
