"""Throughput and peak memory of InternImage (each DCNv3 backend) beside ConvNeXt, Swin and (with timm) MViTv2.

All models run in one process with the same batch, resolution, dtype, threads, warm-up and repeat policy, and the
timed repeats are interleaved (model A, B, C, A, B, C, ...) so machine drift hits every model alike. Ratios are to
ConvNeXt-T measured in the same run.

    python bench/throughput.py --quick                      # a few minutes on a 2-core CPU
    python bench/throughput.py --models internimage-t convnext-t swin-t --batch 1 8 --dtype float32 bfloat16
    python bench/throughput.py --quick --impls compiled --models internimage-t convnext-t --compile  # + inductor

`--compile` adds, for every inference case, its `torch.compile` twin (mode "inference-inductor": inductor with
freezing); ratios of those rows are to compiled ConvNeXt-T. The first call, the compile, is timed on its own with
inductor's on-disk caches in a fresh directory (removed afterwards), after an untimed warm-up compile of a small
model: the time is a first compile of that model, whatever earlier runs left behind and whichever model comes first.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

# ImageNet-1k top-1 of the official weights at 224² (papers / model cards), for the accuracy-vs-speed plot.
TOP1 = {
    "internimage-t": 83.5,
    "internimage-s": 84.2,
    "internimage-b": 84.9,
    "flash-internimage-t": 83.6,
    "flash-internimage-s": 84.4,
    "flash-internimage-b": 84.9,
    "convnext-t": 82.1,
    "convnext-s": 83.1,
    "convnext-b": 83.8,
    "swin-t": 81.3,
    "swin-s": 83.0,
    "swin-b": 83.5,
    "mvitv2-t": 82.3,
    "mvitv2-s": 83.6,
}


def with_trained_like_sampling(model: torch.nn.Module) -> torch.nn.Module:
    """Give every DCNv3 layer non-zero offset and mask projections, as in a trained model.

    The official initialisation zeroes them: every sample then sits on its own pixel grid, and the DCNv3 op runs
    ~1.8x faster than with the spread-out offsets of real weights (better cache locality). Offsets of about a pixel
    and uneven point weights keep the benchmark honest about what a trained InternImage costs.
    """
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "InternImageDCNv3":
                for linear, spread in ((module.offset, 2.0), (module.mask, 1.0)):  # offsets: mean |d| ~1 px
                    fan_in = linear.weight.shape[1]
                    linear.weight.copy_(spread * torch.randn(linear.weight.shape, generator=generator) / fan_in**0.5)
            elif type(module).__name__ == "InternImageDCNv4":  # one packed Linear: per group 2P offsets, P weights
                weight = module.offset_mask.weight
                weight.copy_(torch.randn(weight.shape, generator=generator) / weight.shape[1] ** 0.5)
                per_group = weight[: module.groups * module.points * 3].view(module.groups, 3 * module.points, -1)
                per_group[:, : 2 * module.points].mul_(2.0)  # offsets: mean |d| ~1 px, as for DCNv3
    return model


def build_model(name: str, tiny: bool = False) -> torch.nn.Module:
    """Randomly initialised classifier (no download). `tiny` shrinks every family for smoke tests."""
    family, size = name.rsplit("-", 1)
    if family in ("internimage", "flash-internimage"):
        import internimage_hf

        flash = family == "flash-internimage"
        if tiny:
            config = internimage_hf.InternImageConfig(
                channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8], num_labels=1000
            )
            if flash:  # DCNv4 keeps 16 channels per group
                config = internimage_hf.InternImageConfig.from_preset(
                    "flash_t", channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8], num_labels=1000
                )
        else:
            config = (
                internimage_hf.InternImageConfig.from_preset("flash_" + size, num_labels=1000)
                if flash
                else internimage_hf.InternImageConfig.from_variant(size, num_labels=1000)
            )
        return with_trained_like_sampling(internimage_hf.InternImageForImageClassification(config))
    if family == "convnext":
        from transformers import ConvNextConfig, ConvNextForImageClassification

        depths = {"t": [3, 3, 9, 3], "s": [3, 3, 27, 3], "b": [3, 3, 27, 3]}[size]
        dims = {"t": [96, 192, 384, 768], "s": [96, 192, 384, 768], "b": [128, 256, 512, 1024]}[size]
        if tiny:
            depths, dims = [1, 1, 1, 1], [16, 32, 64, 128]
        return ConvNextForImageClassification(ConvNextConfig(depths=depths, hidden_sizes=dims, num_labels=1000))
    if family == "swin":
        from transformers import SwinConfig, SwinForImageClassification

        embed, window = {"t": 96, "s": 96, "b": 128}[size], 7
        depths = {"t": [2, 2, 6, 2], "s": [2, 2, 18, 2], "b": [2, 2, 18, 2]}[size]
        heads = {"t": [3, 6, 12, 24], "s": [3, 6, 12, 24], "b": [4, 8, 16, 32]}[size]
        if tiny:
            embed, depths, heads, window = 16, [1, 1, 1, 1], [1, 2, 4, 8], 2
        return SwinForImageClassification(
            SwinConfig(embed_dim=embed, depths=depths, num_heads=heads, window_size=window, num_labels=1000)
        )
    if family == "mvitv2":
        import timm  # optional: only when installed

        return timm.create_model({"t": "mvitv2_tiny", "s": "mvitv2_small"}[size], pretrained=False)
    raise ValueError(f"unknown model {name!r}")


def logits_of(output):
    return output.logits if hasattr(output, "logits") else output


@dataclass
class Case:
    model: str
    impl: str
    mode: str
    batch: int
    dtype: str
    module: torch.nn.Module
    inputs: torch.Tensor
    labels: torch.Tensor
    optimizer: torch.optim.Optimizer | None = None
    times: list[float] = field(default_factory=list)
    peak_mem_mb: float | None = None
    error: str | None = None
    steps: int = 1  # steps per timed repeat (see timed)
    compile_s: float | None = None  # inductor cases: seconds of the first call (compilation included)

    def context(self):
        """Backend selection for InternImage; bf16 runs use CPU/GPU autocast."""
        stack = contextlib.ExitStack()
        if self.impl in ("reference", "compiled"):
            stack.enter_context(_env(INTERNIMAGE_DCNV3_BACKEND=self.impl))
        elif self.impl == "official":  # what the official code runs: reference op, plain PyTorch layers
            stack.enter_context(_env(INTERNIMAGE_DCNV3_BACKEND="reference"))
        elif self.impl == "free-op":
            stack.enter_context(_free_dcnv3_op())
        if self.dtype in ("bfloat16", "float16"):
            stack.enter_context(torch.autocast(self.inputs.device.type, dtype=getattr(torch, self.dtype)))
        return stack

    def step(self):
        with self.context():
            if self.mode != "train":
                with torch.inference_mode():
                    logits_of(self.module(self.inputs))
            else:
                loss = torch.nn.functional.cross_entropy(logits_of(self.module(self.inputs)).float(), self.labels)
                loss.backward()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _free_dcnv3_op():
    """A bound, not a model: every layer as `compiled` runs it, but the DCNv3 core returns its input unchanged.

    Its throughput is what InternImage would reach with a DCNv3 kernel that costs nothing, so free-op / reference
    is the largest end-to-end gain any DCNv3 kernel can give over the reference op on this machine.
    """
    from internimage_hf.ops import DCNv3Core

    # free-op models run their DCNv3 layers on the class forward (`prepare_internimage`).
    forward = DCNv3Core.forward
    DCNv3Core.forward = lambda self, input, *args, **kwargs: input
    try:
        yield
    finally:
        DCNv3Core.forward = forward


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(case: Case, device: torch.device) -> float:
    """Seconds per step, over `case.steps` back-to-back steps (so that one repeat of a fast case is not a single
    sub-0.1 s step, where scheduler noise dominates)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(case.steps):
            case.step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / case.steps
    begin = time.perf_counter()
    for _ in range(case.steps):
        case.step()
    return (time.perf_counter() - begin) / case.steps


def measure_peak_memory(case: Case, device: torch.device) -> float | None:
    """Peak memory of one step: the CUDA allocator's peak, or on CPU the profiler's allocation high-water mark."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        case.step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        case.step()
    current = peak = 0  # replay each op's own allocations minus frees, in time order: live bytes over time
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak / 2**20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="default: internimage-t/s/b, convnext-t/s/b, swin-t/s/b (+ mvitv2-t/s if timm is installed)",
    )
    p.add_argument(
        "--impls",
        nargs="+",
        default=["compiled", "reference", "official"],
        help="InternImage implementations: compiled / reference DCNv3 op (with this package's layers), "
        "official = reference op and plain PyTorch layers, as the official code computes; "
        "free-op = a bound: compiled with a DCNv3 op that costs nothing (returns its input)",
    )
    p.add_argument("--modes", nargs="+", default=["inference", "train"], choices=["inference", "train"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--train-batch", type=int, default=None, help="batch for training steps (default: largest --batch)")
    p.add_argument("--dtype", nargs="+", default=None, help="default: float32 bfloat16 (CPU); + float16 on CUDA")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--min-time",
        type=float,
        default=0.3,
        help="seconds a timed repeat lasts at least (fast cases run several steps per repeat)",
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--compile",
        action="store_true",
        help="add a torch.compile (inductor, freezing) twin of every inference case, mode inference-inductor",
    )
    p.add_argument("--quick", action="store_true", help="T models only, batch 1 and 8, float32, one warm-up step")
    p.add_argument("--tiny", action="store_true", help="tiny configurations (keeps the script working in tests)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--json", default="bench/results/throughput.json")
    p.add_argument("--plot", default=None, help="write a throughput-vs-top-1 PNG here")
    args = p.parse_args(argv)
    if args.quick:
        args.models = args.models or ["internimage-t", "flash-internimage-t", "convnext-t", "swin-t"]
        args.dtype = args.dtype or ["float32"]
        args.warmup = min(args.warmup, 1)
    if args.models is None:
        args.models = [f"{f}-{s}" for f in ("internimage", "convnext", "swin") for s in "tsb"]
        try:
            import timm  # noqa: F401

            args.models += ["mvitv2-t", "mvitv2-s"]
        except ImportError:
            pass
    if args.dtype is None:
        args.dtype = ["float32", "bfloat16"] + (["float16"] if args.device.startswith("cuda") else [])
    return args


def prepare_internimage(
    module: torch.nn.Module, impl: str, mode: str, device: torch.device, compiling: bool = False
) -> None:
    """InternImage as users run it: `from_pretrained` kernelizes (transformers >= 5.25; else `kernels.kernelize`),
    which gives the DCNv3 layers the compiled kernel and, on the CPU, the oneDNN Linear/MLP layers. `official`
    stays plain (PyTorch layers, reference op); `reference` and `free-op` keep the CPU layers but put the DCNv3
    layers on their class forward (the reference, which `_free_dcnv3_op` patches). `compiling` kernelizes for
    torch.compile (Mode.TORCH_COMPILE: the plain Linear/MLP layers, inductor picks the GEMMs)."""
    from kernels import Mode, kernelize

    from internimage_hf.ops import use_reference

    if impl != "official":
        kernel_mode = Mode.TRAINING if mode == "train" else Mode.INFERENCE
        kernelize(module, device=device.type, mode=kernel_mode | Mode.TORCH_COMPILE if compiling else kernel_mode)
    if impl in ("reference", "official", "free-op"):
        use_reference(module)


def compile_module(module: torch.nn.Module) -> torch.nn.Module:
    """`module` under torch.compile for inference: inductor with freezing (set only inside the bench)."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # constant weights: prepacked GEMM/conv weights, folded constants
    return torch.compile(module, fullgraph=True)


def build_cases(args, device) -> list[Case]:
    cases = []
    train_batch = args.train_batch or max(args.batch)
    for name in args.models:
        impls = args.impls if "internimage" in name else ["-"]
        unknown = set(impls) - {"compiled", "reference", "official", "free-op", "-"}
        if unknown:
            raise SystemExit(f"unknown --impls {sorted(unknown)}")
        for impl in impls:
            for mode in args.modes:
                batches = args.batch if mode == "inference" else [train_batch]
                for batch in batches:
                    for dtype in args.dtype:
                        g = torch.Generator().manual_seed(0)
                        inputs = torch.randn(batch, 3, args.size, args.size, generator=g).to(device)
                        labels = torch.randint(0, 1000, (batch,), generator=g).to(device)
                        runners = ["eager", "inductor"] if args.compile and mode == "inference" else ["eager"]
                        for runner in runners:
                            module = build_model(name, tiny=args.tiny).to(device)
                            module.train(mode == "train")
                            if "internimage" in name:
                                prepare_internimage(module, impl, mode, device, compiling=runner == "inductor")
                            opt = torch.optim.AdamW(module.parameters(), lr=1e-5) if mode == "train" else None
                            case_mode = mode
                            if runner == "inductor":
                                module, case_mode = compile_module(module), "inference-inductor"
                            cases.append(Case(name, impl, case_mode, batch, dtype, module, inputs, labels, opt))
    return cases


@contextlib.contextmanager
def fresh_inductor_cache():
    """Inductor's on-disk caches (compiled kernels, FX graphs) in a new temporary directory for the block."""
    with tempfile.TemporaryDirectory(prefix="bench-inductor-") as cache, _env(TORCHINDUCTOR_CACHE_DIR=cache):
        yield cache


def warm_up_inductor(device: torch.device) -> None:
    """Compile a small conv + Linear model once, untimed, so that inductor's one-time costs (its imports, the C++
    toolchain's first runs) do not land on whichever model is compiled first (~10 s on a 2-core CPU)."""
    layers = (torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GELU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    net = torch.nn.Sequential(*layers, torch.nn.LayerNorm(8), torch.nn.Linear(8, 4))
    net = compile_module(net.to(device).eval())
    with fresh_inductor_cache(), torch.inference_mode():
        net(torch.randn(2, 3, 16, 16, device=device))
    sync(device)


def cold_compile_seconds(case: Case, device: torch.device) -> float:
    """Seconds of an inductor case's first call (the compile) with empty on-disk caches: a first compile, not a
    cache hit from an earlier run (which made compile times depend on what the machine had run before)."""
    with fresh_inductor_cache():
        begin = time.perf_counter()
        case.step()
        sync(device)
        return time.perf_counter() - begin


def run(args) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = build_cases(args, device)
    if any(case.mode == "inference-inductor" for case in cases):
        warm_up_inductor(device)
    for case in cases:  # warm-up (and kernel loading / autotuning, compilation) outside the timed loop
        try:
            if case.mode == "inference-inductor":
                case.compile_s = cold_compile_seconds(case, device)
            for _ in range(args.warmup):
                case.step()
            sync(device)
            case.steps = max(1, math.ceil(args.min_time / timed(case, device)))
        except Exception as error:  # a model that cannot run here is reported, not fatal
            case.error = f"{type(error).__name__}: {error}"
    live = [c for c in cases if c.error is None]
    for _ in range(args.repeats):  # interleaved
        for case in live:
            case.times.append(timed(case, device))
    if not args.no_memory:
        for case in live:
            case.peak_mem_mb = measure_peak_memory(case, device)
    rows = []
    for case in cases:
        median = statistics.median(case.times) if case.times else None
        rows.append(
            {
                "model": case.model,
                "impl": case.impl,
                "mode": case.mode,
                "batch": case.batch,
                "dtype": case.dtype,
                "img_per_s": (case.batch / median) if median else None,
                "peak_mem_mb": case.peak_mem_mb,
                "compile_s": case.compile_s,
                "error": case.error,
            }
        )
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "size": args.size,
        "repeats": args.repeats,
        "min_time_s": args.min_time,
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rows": rows,
    }


def cpu_description() -> str:
    """CPU model and the vector ISA that decides GEMM and kernel speed (figures mean nothing without them)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    isa = [
        name
        for name, flag in (
            ("AVX2", "avx2"),
            ("AVX-512", "avx512f"),
            ("AVX-512 BF16", "avx512_bf16"),
            ("AMX", "amx_tile"),
        )
        if flag in flags
    ]
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")()
    # Libraries held below what the CPU has (e.g. to run as an AVX2-only machine would) are part of the machine.
    caps = [f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS") if os.environ.get(k)]
    held = f"; {', '.join(caps)}" if caps else ""
    return f"{model}, {' / '.join(isa) or 'no AVX2'} (torch dispatch: {capability}{held}), {os.cpu_count()} cores"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_description()


def markdown(result: dict) -> str:
    rows = result["rows"]
    base = {
        (r["mode"], r["batch"], r["dtype"]): r["img_per_s"]
        for r in rows
        if r["model"] == "convnext-t" and r["img_per_s"]
    }
    lines = [
        f"device: {result['device']}, torch {result['torch']}, {result['threads']} threads, "
        f"{result['size']}², median of {result['repeats']} interleaved repeats, {result['date']}",
        "",
        "| model | DCNv3 | mode | batch | dtype | img/s | × ConvNeXt-T | peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["error"]:
            lines.append(
                f"| {r['model']} | {r['impl']} | {r['mode']} | {r['batch']} | {r['dtype']} | "
                f"error: {r['error'][:60]} | | |"
            )
            continue
        ref = base.get((r["mode"], r["batch"], r["dtype"]))
        ratio = f"{r['img_per_s'] / ref:.2f}" if ref else "–"
        mem = f"{r['peak_mem_mb']:.0f}" if r["peak_mem_mb"] is not None else "–"
        lines.append(
            f"| {r['model']} | {r['impl']} | {r['mode']} | {r['batch']} | {r['dtype']} | "
            f"{r['img_per_s']:.2f} | {ratio} | {mem} |"
        )
    return "\n".join(lines)


def impl_ratios(result: dict) -> str:
    """Same-run speed-ups of the compiled path over the pure-PyTorch ones (and the free-op bound), per case."""
    speed = {
        (r["model"], r["impl"], r["mode"], r["batch"], r["dtype"]): r["img_per_s"]
        for r in result["rows"]
        if r["img_per_s"]
    }
    lines = []
    for model, impl, mode, batch, dtype in speed:
        if impl != "compiled":
            continue
        parts = []
        for numerator, denominator in (
            ("compiled", "reference"),
            ("compiled", "official"),
            ("free-op", "reference"),
            ("free-op", "official"),
        ):
            num = speed.get((model, numerator, mode, batch, dtype))
            den = speed.get((model, denominator, mode, batch, dtype))
            if num and den:
                parts.append(f"{numerator} / {denominator} {num / den:.2f}×")
        if parts:
            lines.append(f"- {model} {mode} batch {batch} {dtype}: " + ", ".join(parts))
    if lines and any("free-op" in line for line in lines):
        lines.append(
            "(free-op: the DCNv3 op replaced by a zero-cost stand-in, so free-op / reference is the most "
            "any DCNv3 kernel can gain end to end)"
        )
    return "\n".join(lines)


def compile_ratios(result: dict) -> str:
    """Same-run speed of each inductor case over its eager twin, its compile time (first call, empty caches) and
    that time over compiled ConvNeXt-T's at the same batch and dtype (issue 16: within 2x)."""
    eager = {
        (r["model"], r["impl"], r["batch"], r["dtype"]): r["img_per_s"]
        for r in result["rows"]
        if r["mode"] == "inference" and r["img_per_s"]
    }
    convnext_compile = {
        (r["batch"], r["dtype"]): r["compile_s"]
        for r in result["rows"]
        if r["mode"] == "inference-inductor" and r["model"] == "convnext-t" and r["compile_s"]
    }
    lines = []
    for r in result["rows"]:
        if r["mode"] != "inference-inductor" or not r["img_per_s"]:
            continue
        base = eager.get((r["model"], r["impl"], r["batch"], r["dtype"]))
        ratio = f"inductor / eager {r['img_per_s'] / base:.2f}×, " if base else ""
        impl = "" if r["impl"] == "-" else f" ({r['impl']})"
        reference = convnext_compile.get((r["batch"], r["dtype"]))
        versus = ""
        if reference and r["model"] != "convnext-t":
            versus = f" ({r['compile_s'] / reference:.1f}× ConvNeXt-T's)"
        lines.append(
            f"- {r['model']}{impl} batch {r['batch']} {r['dtype']}: {ratio}compile (first call, empty caches) "
            f"{r['compile_s']:.0f} s{versus}"
        )
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = {}
    for r in result["rows"]:
        if (
            r["mode"] == "inference"
            and r["dtype"] == "float32"
            and r["img_per_s"]
            and r["model"] in TOP1
            and r["impl"] != "free-op"
        ):
            key = (r["model"], r["batch"])
            best[key] = max(best.get(key, 0), r["img_per_s"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for family, marker in (("internimage", "o"), ("convnext", "s"), ("swin", "^"), ("mvitv2", "D")):
        pts = sorted(
            (v, TOP1[m])
            for (m, b), v in best.items()
            if m.startswith(family) and b == max(b2 for (m2, b2) in best if m2 == m)
        )
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=family)
    ax.set_xlabel("images / s (inference, float32, largest batch)")
    ax.set_ylabel("ImageNet-1k top-1 (%)")
    ax.set_title(result["device"])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(markdown(result))
    ratios = impl_ratios(result)
    if ratios:
        print("\n" + ratios)
    compiled = compile_ratios(result)
    if compiled:
        print("\n" + compiled)
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.plot:
        plot(result, args.plot)
    return 1 if all(r["error"] for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
