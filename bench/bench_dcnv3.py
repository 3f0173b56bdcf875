"""DCNv3 core op: pure-PyTorch reference vs the compiled kernel, forward and forward+backward.

Shapes: the four InternImage-T levels at 224² (56²/C64/G4, 28²/C128/G8, 14²/C256/G16, 7²/C512/G32) and an
InternImage-B level-0 shape (56²/C112/G7), 3x3 kernel, stride 1, pad 1, at batch 1 and 8. Inputs are random,
offsets a few pixels (N(0, 2)), masks softmaxed over each group's points. Every timed repeat runs the candidates
back to back (ref fwd, compiled fwd, ref fwd+bwd, compiled fwd+bwd, then again), so machine drift hits all of them
alike; the table reports medians and the ratios measured in this one run, plus the compiled op's achieved
bandwidth against the bytes the op must move (read input, offset, mask; write output; backward also reads
grad_output and writes the three gradients).

Then DCNv4 against DCNv3, both compiled, at the InternImage-T levels: DCNv3 as the model runs it (mask logits,
softmax fused into the op) against DCNv4 on its packed offset_mask (padded to a multiple of 8 channels, as the
official Linear makes it), forward and forward+backward, interleaved the same way (--no-dcnv4 skips it).

    python bench/bench_dcnv3.py                    # needs `internimage-hf build-kernels` first (or --build)
    python bench/bench_dcnv3.py --dtype bfloat16 --threads 1 --json out.json
    python bench/bench_dcnv3.py --only-dcnv4 --batch 1 8
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a source checkout without install

from internimage_hf.ops import dcnv3_core_reference, dcnv4_offset_mask_channels  # noqa: E402

SHAPES = [  # (label, H=W, C, G)
    ("T level 1", 56, 64, 4),
    ("T level 2", 28, 128, 8),
    ("T level 3", 14, 256, 16),
    ("T level 4", 7, 512, 32),
    ("B level 1", 56, 112, 7),
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64, "float16": torch.float16}


def make_inputs(n, size, channels, groups, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    points = 9
    x = torch.randn(n, size, size, channels, generator=g)
    offset = 2.0 * torch.randn(n, size, size, groups * points * 2, generator=g)
    mask = torch.randn(n, size, size, groups, points, generator=g).softmax(-1).flatten(-2)
    grad = torch.randn(n, size, size, channels, generator=g)
    args = (3, 3, 1, 1, 1, 1, 1, 1, groups, channels // groups, 1.0, 0)
    return [t.to(device=device, dtype=dtype) for t in (x, offset, mask, grad)], args


def op_bytes(n, size, channels, groups, elem):
    points = 9
    image = n * size * size * channels
    offset = n * size * size * groups * points * 2
    mask = n * size * size * groups * points
    forward = (image + offset + mask + image) * elem  # read input, offset, mask; write output
    backward = (image + image + offset + mask + image + offset + mask) * elem  # + grad_out; write three grads
    return forward, forward + backward


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def candidates(op, inputs, args):
    x, offset, mask, grad = inputs

    def forward(fn):
        def run():
            with torch.no_grad():
                fn(x, offset, mask, *args)

        return run

    def forward_backward(fn):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, offset, mask)]

        def run():
            for t in leaves:
                t.grad = None
            fn(*leaves, *args).backward(grad)

        return run

    return {
        "ref fwd": forward(dcnv3_core_reference),
        "compiled fwd": forward(op),
        "ref fwd+bwd": forward_backward(dcnv3_core_reference),
        "compiled fwd+bwd": forward_backward(op),
    }


def measure(op, shape, n, dtype, device, repeats, min_time):
    label, size, channels, groups = shape
    inputs, args = make_inputs(n, size, channels, groups, dtype, device)
    runs = candidates(op, inputs, args)
    for run in runs.values():  # warm-up (allocator, threads, lazy init)
        run()
        run()
    times = {name: [] for name in runs}
    start = time.perf_counter()
    r = 0
    while r < repeats or (time.perf_counter() - start < min_time and r < 20 * repeats):
        for name, run in runs.items():
            times[name].append(timed(run, device))
        r += 1
    med = {name: statistics.median(t) for name, t in times.items()}
    fwd_bytes, fb_bytes = op_bytes(n, size, channels, groups, inputs[0].element_size())
    return {
        "shape": label,
        "size": size,
        "channels": channels,
        "groups": groups,
        "batch": n,
        "repeats": r,
        **{f"{k} ms": v * 1e3 for k, v in med.items()},
        "fwd speed-up": med["ref fwd"] / med["compiled fwd"],
        "fwd+bwd speed-up": med["ref fwd+bwd"] / med["compiled fwd+bwd"],
        "compiled fwd GB/s": fwd_bytes / med["compiled fwd"] / 1e9,
        "compiled fwd+bwd GB/s": fb_bytes / med["compiled fwd+bwd"] / 1e9,
    }


def make_v4_inputs(n, size, channels, groups, dtype, device, seed=0):
    """DCNv3 inputs as the model feeds them (mask logits) and the same offsets and weights packed for DCNv4."""
    g = torch.Generator().manual_seed(seed)
    points = 9
    x = torch.randn(n, size, size, channels, generator=g)
    offset = 2.0 * torch.randn(n, size, size, groups, points * 2, generator=g)
    logits = torch.randn(n, size, size, groups, points, generator=g)
    packed = torch.cat([offset, logits.softmax(-1)], -1).flatten(-2)
    pad = dcnv4_offset_mask_channels(groups, points) - packed.shape[-1]
    offset_mask = torch.nn.functional.pad(packed, (0, pad))
    grad = torch.randn(n, size, size, channels, generator=g)
    args = (3, 3, 1, 1, 1, 1, 1, 1, groups, channels // groups, 1.0, 0)
    tensors = (x, offset.flatten(-2), logits.flatten(-2), offset_mask, grad)
    return [t.to(device=device, dtype=dtype) for t in tensors], args


def v4_candidates(op, inputs, args):
    x, offset, logits, offset_mask, grad = inputs

    def v3(*tensors):
        return op(*tensors, *args, True)  # mask_softmax: the fused softmax, as InternImage's layers call it

    def v4(*tensors):
        return op.dcnv4(*tensors, *args)

    def forward(fn, tensors):
        def run():
            with torch.no_grad():
                fn(*tensors)

        return run

    def forward_backward(fn, tensors):
        leaves = [t.detach().clone().requires_grad_(True) for t in tensors]

        def run():
            for t in leaves:
                t.grad = None
            fn(*leaves).backward(grad)

        return run

    return {
        "v3 fwd": forward(v3, (x, offset, logits)),
        "v4 fwd": forward(v4, (x, offset_mask)),
        "v3 fwd+bwd": forward_backward(v3, (x, offset, logits)),
        "v4 fwd+bwd": forward_backward(v4, (x, offset_mask)),
    }


def measure_v4(op, shape, n, dtype, device, repeats, min_time):
    label, size, channels, groups = shape
    inputs, args = make_v4_inputs(n, size, channels, groups, dtype, device)
    runs = v4_candidates(op, inputs, args)
    for run in runs.values():
        run()
        run()
    times = {name: [] for name in runs}
    start = time.perf_counter()
    r = 0
    while r < repeats or (time.perf_counter() - start < min_time and r < 20 * repeats):
        for name, run in runs.items():
            times[name].append(timed(run, device))
        r += 1
    med = {name: statistics.median(t) for name, t in times.items()}
    return {
        "shape": label,
        "size": size,
        "channels": channels,
        "groups": groups,
        "batch": n,
        "repeats": r,
        **{f"{k} ms": v * 1e3 for k, v in med.items()},
        "fwd ratio": med["v3 fwd"] / med["v4 fwd"],
        "fwd+bwd ratio": med["v3 fwd+bwd"] / med["v4 fwd+bwd"],
    }


def v4_table(rows):
    head = (
        "| shape | N | DCNv3 fwd ms | DCNv4 fwd ms | fwd v3/v4 | DCNv3 fwd+bwd ms | DCNv4 fwd+bwd ms | fwd+bwd v3/v4 |"
    )
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        lines.append(
            f"| {r['shape']} ({r['size']}², C{r['channels']}, G{r['groups']}) | {r['batch']} | {r['v3 fwd ms']:.3f} | "
            f"{r['v4 fwd ms']:.3f} | {r['fwd ratio']:.2f} | {r['v3 fwd+bwd ms']:.3f} | {r['v4 fwd+bwd ms']:.3f} | "
            f"{r['fwd+bwd ratio']:.2f} |"
        )
    return "\n".join(lines)


def describe_cpu() -> str:
    try:
        from throughput import cpu_description  # bench/throughput.py (this script's folder is on sys.path)

        return cpu_description()
    except Exception:  # run from elsewhere, or throughput's imports missing
        return platform.processor() or platform.machine()


def table(rows):
    head = (
        "| shape | N | ref fwd ms | compiled fwd ms | fwd × | ref fwd+bwd ms | compiled fwd+bwd ms | fwd+bwd × | "
        "fwd GB/s | fwd+bwd GB/s |"
    )
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        lines.append(
            f"| {r['shape']} ({r['size']}², C{r['channels']}, G{r['groups']}) | {r['batch']} | {r['ref fwd ms']:.2f} | "
            f"{r['compiled fwd ms']:.3f} | {r['fwd speed-up']:.1f} | {r['ref fwd+bwd ms']:.2f} | "
            f"{r['compiled fwd+bwd ms']:.3f} | {r['fwd+bwd speed-up']:.1f} | {r['compiled fwd GB/s']:.1f} | "
            f"{r['compiled fwd+bwd GB/s']:.1f} |"
        )
    return "\n".join(lines)


def geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=7, help="minimum timed repeats per candidate")
    parser.add_argument("--min-time", type=float, default=1.0, help="keep repeating small shapes for this many s")
    parser.add_argument("--quick", action="store_true", help="batch 1, 3 repeats (smoke test)")
    parser.add_argument("--build", action="store_true", help="build the kernel first if it is missing")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument("--no-dcnv4", action="store_true", help="skip the DCNv4 vs DCNv3 comparison")
    parser.add_argument("--only-dcnv4", action="store_true", help="only the DCNv4 vs DCNv3 comparison")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.batch, args.repeats, args.min_time = [1], 3, 0.0

    from internimage_hf.ops.loader import get_compiled_op

    if args.build:
        from internimage_hf.ops.build import build_kernels

        build_kernels(verbose=False)
    try:
        op = get_compiled_op(required=True)
    except RuntimeError as err:
        print(f"bench_dcnv3: {err}", file=sys.stderr)
        return 1
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    probe = torch.empty(1, device=device, dtype=dtype)
    if not op.supports(probe):
        print(
            f"bench_dcnv3: the compiled kernel ({op.source}) does not handle {args.dtype} on {device}", file=sys.stderr
        )
        return 1

    cpu = describe_cpu() if device.type == "cpu" else torch.cuda.get_device_name(device)
    rows = []
    if not args.only_dcnv4:
        for n in args.batch:
            for shape in SHAPES:
                rows.append(measure(op, shape, n, dtype, device, args.repeats, args.min_time))
                print(f"  measured {shape[0]} N={n}", file=sys.stderr, flush=True)
        print(
            f"DCNv3 core, {args.dtype} on {device} ({cpu}, {torch.get_num_threads()} threads), torch "
            f"{torch.__version__}, kernel: {op.source}\n"
        )
        print(table(rows))
        t_rows = [r for r in rows if r["shape"].startswith("T ")]
        print(
            f"\nInternImage-T levels, geometric mean: forward {geomean([r['fwd speed-up'] for r in t_rows]):.1f}×, "
            f"forward+backward {geomean([r['fwd+bwd speed-up'] for r in t_rows]):.1f}× (minimum "
            f"{min(r['fwd speed-up'] for r in t_rows):.1f}× / {min(r['fwd+bwd speed-up'] for r in t_rows):.1f}×)"
        )
    v4_rows = []
    if not args.no_dcnv4 and op.has_dcnv4 and op.supports_dcnv4(probe):
        for n in args.batch:
            for shape in SHAPES:
                if shape[0].startswith("T "):
                    v4_rows.append(measure_v4(op, shape, n, dtype, device, args.repeats, args.min_time))
                    print(f"  measured DCNv4 vs DCNv3 {shape[0]} N={n}", file=sys.stderr, flush=True)
        print(
            f"\nDCNv4 vs DCNv3 (fused softmax), both compiled, {args.dtype} on {device} ({cpu}, "
            f"{torch.get_num_threads()} threads), torch {torch.__version__}, kernel: {op.source}\n"
        )
        print(v4_table(v4_rows))
        print(
            f"\nDCNv3 time / DCNv4 time, geometric mean over the rows: forward "
            f"{geomean([r['fwd ratio'] for r in v4_rows]):.2f}×, forward+backward "
            f"{geomean([r['fwd+bwd ratio'] for r in v4_rows]):.2f}× (minimum "
            f"{min(r['fwd ratio'] for r in v4_rows):.2f}× / {min(r['fwd+bwd ratio'] for r in v4_rows):.2f}×)"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "dtype": args.dtype,
                    "device": str(device),
                    "threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    "kernel": op.source,
                    "cpu": cpu,
                    "rows": rows,
                    "dcnv4_rows": v4_rows,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
