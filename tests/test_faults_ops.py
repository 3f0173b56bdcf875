"""Fault injection for the DCNv3 op and its kernel cache.

Every case must end in a clear Python exception, or in a warning plus the reference result: never a crash of the
interpreter. The crash-prone ones (direct calls into the C++ ops, loading damaged or hostile kernel caches) run in a
child process, so that a crash fails the test instead of killing pytest.

Groups (case counts in the test ids): bad arguments, special values, empty batches and empty outputs,
non-contiguous tensors, random configurations (compiled vs reference, float64, 1e-12), the raw C++ ops, corrupt /
truncated / hostile kernel caches.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from internimage_hf.ops import dcnv3_core, dcnv3_core_reference, dcnv3_output_size

from .conftest import rel_err

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("reference", "compiled")
NAN, INF = float("nan"), float("inf")


def make_case(
    n=2,
    h=6,
    w=7,
    group=2,
    gc=4,
    kh=3,
    kw=3,
    stride=(1, 1),
    pad=(1, 1),
    dil=(1, 1),
    scale=1.0,
    rc=0,
    offset_mag=1.5,
    dtype=torch.float64,
    seed=0,
):
    g = torch.Generator().manual_seed(seed)
    points = kh * kw - rc
    ho = dcnv3_output_size(h, kh, stride[0], pad[0], dil[0])
    wo = dcnv3_output_size(w, kw, stride[1], pad[1], dil[1])
    x = torch.randn(n, h, w, group * gc, generator=g, dtype=torch.float64)
    offset = offset_mag * torch.randn(n, max(ho, 0), max(wo, 0), group * points * 2, generator=g, dtype=torch.float64)
    mask = torch.randn(n, max(ho, 0), max(wo, 0), group, points, generator=g, dtype=torch.float64)
    mask = mask.softmax(-1).flatten(-2)
    args = [kh, kw, stride[0], stride[1], pad[0], pad[1], dil[0], dil[1], group, gc, scale, rc]
    return x.to(dtype), offset.to(dtype), mask.to(dtype), args


def run(backend, x, offset, mask, args, mask_softmax=False):
    return dcnv3_core(x, offset, mask, *args, mask_softmax=mask_softmax, backend=backend)


@pytest.fixture
def op(use_kernel):
    """dcnv3_core resolves to the session's compiled build (backend "compiled" works)."""
    return use_kernel


# ---------------------------------------------------------------------------------------------------------------
# Bad arguments: one clear exception on every backend and on the kernel package's own entry point
# ---------------------------------------------------------------------------------------------------------------
ARG_INDEX = {
    "kernel_h": 0,
    "kernel_w": 1,
    "stride_h": 2,
    "stride_w": 3,
    "pad_h": 4,
    "pad_w": 5,
    "dilation_h": 6,
    "dilation_w": 7,
    "group": 8,
    "group_channels": 9,
    "offset_scale": 10,
    "remove_center": 11,
}

BAD_PARAMS = [  # (id, overrides, message)
    ("kernel_h=0", {"kernel_h": 0}, "kernel_h must be >= 1"),
    ("kernel_w=-1", {"kernel_w": -1}, "kernel_w must be >= 1"),
    ("stride_h=0", {"stride_h": 0}, "stride_h must be >= 1"),
    ("stride_w=-2", {"stride_w": -2}, "stride_w must be >= 1"),
    ("dilation_h=0", {"dilation_h": 0}, "dilation_h must be >= 1"),
    ("dilation_w=-1", {"dilation_w": -1}, "dilation_w must be >= 1"),
    ("group=0", {"group": 0}, "group must be >= 1"),
    ("group=-2", {"group": -2}, "group must be >= 1"),
    ("group_channels=0", {"group_channels": 0}, "group_channels must be >= 1"),
    ("pad_h=-1", {"pad_h": -1}, "padding must be >= 0"),
    ("even kernel with remove_center", {"kernel_h": 2, "remove_center": 1}, "odd kernel"),
    ("zero points (1x1, remove_center)", {"kernel_h": 1, "kernel_w": 1, "remove_center": 1}, "no sampling points"),
    ("offset_scale=nan", {"offset_scale": NAN}, "offset_scale must be finite"),
    ("offset_scale=inf", {"offset_scale": INF}, "offset_scale must be finite"),
    ("offset_scale=-inf", {"offset_scale": -INF}, "offset_scale must be finite"),
]


def _with(args, overrides):
    args = list(args)
    for name, value in overrides.items():
        args[ARG_INDEX[name]] = value
    return args


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BAD_PARAMS, ids=[c[0] for c in BAD_PARAMS])
def test_bad_parameters_raise_one_value_error(op, backend, case):
    _, overrides, message = case
    x, offset, mask, args = make_case()
    args = _with(args, overrides)
    if "kernel_h" in overrides and overrides["kernel_h"] == 1:  # offset/mask of the right (empty) width
        offset, mask = offset[..., :0], mask[..., :0]
    with pytest.raises(ValueError, match=message):
        run(backend, x, offset, mask, args)


@pytest.mark.parametrize("case", BAD_PARAMS, ids=[c[0] for c in BAD_PARAMS])
def test_bad_parameters_raise_in_the_kernel_package(op, case):
    """The kernel package (what `kernels` users call) refuses them in Python too, before any C++ runs."""
    _, overrides, message = case
    x, offset, mask, args = make_case()
    with pytest.raises(ValueError, match=message):
        op.dcnv3_core(x, offset, mask, *_with(args, overrides))


BAD_TENSORS = [  # (id, transform of (x, offset, mask), exception types, message)
    ("channel mismatch", lambda x, o, m: (x[..., :-1], o, m), (ValueError, RuntimeError), "channels"),
    ("input 3-d", lambda x, o, m: (x[0], o, m), (ValueError,), "channels-last"),
    ("input 5-d", lambda x, o, m: (x[None], o, m), (ValueError,), "channels-last"),
    ("offset 3-d", lambda x, o, m: (x, o[0], m), (ValueError, RuntimeError), "offset"),
    ("mask 5-d", lambda x, o, m: (x, o, m[None]), (ValueError, RuntimeError), "mask"),
    ("offset wrong width", lambda x, o, m: (x, o[..., :-1], m), (ValueError, RuntimeError), "offset must have shape"),
    ("mask wrong height", lambda x, o, m: (x, o, m[:, :-1]), (ValueError, RuntimeError), "mask must have shape"),
    ("offset wrong batch", lambda x, o, m: (x, o[:1], m), (ValueError, RuntimeError), "offset must have shape"),
    ("integer input", lambda x, o, m: (x.long(), o, m), (TypeError,), "floating-point"),
    ("complex input", lambda x, o, m: (x.to(torch.complex128), o, m), (TypeError,), "real|floating"),
    ("bool input", lambda x, o, m: (x > 0, o, m), (TypeError,), "floating-point"),
    ("offset on another device", lambda x, o, m: (x, o.to("meta"), m), (ValueError,), "one device"),
    ("mask on another device", lambda x, o, m: (x, o, m.to("meta")), (ValueError,), "one device"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BAD_TENSORS, ids=[c[0] for c in BAD_TENSORS])
def test_bad_tensors_raise(op, backend, case):
    _, transform, errors, message = case
    x, offset, mask, args = make_case()
    x, offset, mask = transform(x, offset, mask)
    with pytest.raises(errors, match=message):
        run(backend, x, offset, mask, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_offsets_and_masks_are_cast_alike(op, backend):
    x, offset, mask, args = make_case()
    offset, mask = offset.round().long(), (mask > 0.1).int()
    expected = dcnv3_core_reference(x, offset.double(), mask.double(), *args)
    assert rel_err(run(backend, x, offset, mask, args), expected) < 1e-12


# ---------------------------------------------------------------------------------------------------------------
# Special values: non-finite in gives non-finite out where it is read, finite elsewhere, the same on both backends
# ---------------------------------------------------------------------------------------------------------------
def _poison(kind, value, x, offset, mask):
    x, offset, mask = x.clone(), offset.clone(), mask.clone()
    if kind == "input":
        x[1, 3, 4, 2] = value
    elif kind == "input-border":
        x[0, 0, :, :] = value  # a whole border row: read only through in-image corners
    elif kind == "offset-x":
        offset[0, 2, 3, 0] = value
    elif kind == "offset-y":
        offset[1, 4, 1, 7] = value
    elif kind == "offset-all":
        offset[:] = value
    elif kind == "mask":
        mask[0, 1, 1, 3] = value
    elif kind == "mask-far":  # a point whose sample is zero (far outside the image): mask * 0 is still NaN
        offset[0, 1, 1, 6:8] = 1e6
        mask[0, 1, 1, 3] = value
    return x, offset, mask


SPECIAL = [
    (kind, value)
    for kind in ("input", "input-border", "offset-x", "offset-y", "offset-all", "mask", "mask-far")
    for value in (NAN, INF, -INF)
]


def _agree(out, ref):
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), finite), "non-finite outputs differ between the backends"
    if finite.any():
        assert rel_err(out[finite], ref[finite]) < 1e-12
    return finite


@pytest.mark.parametrize("gc", [4, 16])  # the generic channel loop and the register-group path
@pytest.mark.parametrize("case", SPECIAL, ids=[f"{k}={v}" for k, v in SPECIAL])
def test_special_values_agree(op, case, gc):
    kind, value = case
    x, offset, mask, args = make_case(h=7, w=8, gc=gc)
    x, offset, mask = _poison(kind, value, x, offset, mask)
    ref = run("reference", x, offset, mask, args)
    out = run("compiled", x, offset, mask, args)
    finite = _agree(out, ref)
    assert not finite.all(), "the poisoned value was read somewhere"
    if kind != "offset-all":
        assert finite.float().mean() > 0.5, "only the outputs that read the value are non-finite"


@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_special_mask_logits_with_fused_softmax_agree(op, value):
    x, offset, mask, args = make_case(h=5, w=6, gc=4)
    logits = mask.log().clone()
    logits[1, 2, 3, 4] = value
    ref = run("reference", x, offset, logits, args, mask_softmax=True)
    out = run("compiled", x, offset, logits, args, mask_softmax=True)
    finite = _agree(out, ref)
    assert finite.all() == (value == -INF)  # a -inf logit is a zero probability; nan/+inf poison their group


def test_non_finite_offsets_give_non_finite_gradients_not_crashes(op):
    x, offset, mask, args = make_case(h=5, w=5, gc=4)
    offset[0, 1, 1, 0] = NAN
    for backend in BACKENDS:
        leaves = [t.clone().requires_grad_(True) for t in (x, offset, mask)]
        run(backend, *leaves, args).sum().backward()
        assert not torch.isfinite(leaves[1].grad).all()
        assert torch.isfinite(leaves[1].grad[1]).all()  # the other image is untouched


# ---------------------------------------------------------------------------------------------------------------
# Empty batches (accepted, with gradients) and empty outputs (one ValueError everywhere, fake impl included)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_softmax", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(op, backend, dtype, mask_softmax):
    x, offset, mask, args = make_case(n=0, dtype=dtype)
    leaves = [t.clone().requires_grad_(True) for t in (x, offset, mask)]
    out = run(backend, *leaves, args, mask_softmax=mask_softmax)
    assert out.shape == (0, 6, 7, 8) and out.dtype == dtype
    out.sum().backward()
    for leaf in leaves:
        assert leaf.grad is not None and leaf.grad.shape == leaf.shape


EMPTY_OUTPUTS = [  # (id, make_case kwargs)
    ("2x2 input, kernel 3, stride 2, pad 0", dict(h=2, w=2, stride=(2, 2), pad=(0, 0))),
    ("2x2 input, kernel 3, stride 1, pad 0", dict(h=2, w=2, pad=(0, 0))),
    ("1x9 input, kernel 3, pad 0", dict(h=1, w=9, pad=(0, 0))),
    ("4x4 input, kernel 3, dilation 2, pad 0", dict(h=4, w=4, dil=(2, 2), pad=(0, 0))),
    ("0x5 input", dict(h=0, w=5)),
    ("5x0 input", dict(h=5, w=0)),
    ("1x1 input, kernel 5, stride 3, pad 1", dict(h=1, w=1, kh=5, kw=5, stride=(3, 3))),
]


@pytest.mark.parametrize("case", EMPTY_OUTPUTS, ids=[c[0] for c in EMPTY_OUTPUTS])
def test_empty_output_is_one_value_error_everywhere(op, case):
    x, offset, mask, args = make_case(**case[1])
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="smaller than the kernel footprint"):
            run(backend, x, offset, mask, args)
    with pytest.raises(ValueError, match="smaller than the kernel footprint"):
        op.dcnv3_core(x, offset, mask, *args)
    # The fake (meta) implementation, what torch.compile sees: the same rule and error, not a (1, 0, 0, C) shape.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx, fo, fm = (mode.from_tensor(t) for t in (x, offset, mask))
        with pytest.raises(ValueError, match="smaller than the kernel footprint"):
            op.functional.ops.dcnv3_forward(fx, fo, fm, *args, False)


def test_output_size_rule_is_one_rule(op):
    """internimage_hf's rule, the kernel package's (fake impl) and the C++ one agree, including just-too-small
    inputs where C++ division would truncate towards zero (2x2, kernel 3, stride 2: 0, not 1)."""
    checked = 0
    for size in range(0, 7):
        for kernel in (1, 2, 3, 5):
            for stride in (1, 2, 3):
                for pad in (0, 1):
                    for dil in (1, 2):
                        rule = dcnv3_output_size(size, kernel, stride, pad, dil)
                        assert op.functional._output_size(size, kernel, stride, pad, dil) == rule
                        x = torch.zeros(1, size, 3, 1, dtype=torch.float64)
                        wo = dcnv3_output_size(3, 1, 1, 0, 1)
                        shape = (1, max(rule, 0), wo)
                        offset, mask = torch.zeros(*shape, 2 * kernel), torch.zeros(*shape, kernel)
                        cpp_args = (kernel, 1, stride, 1, pad, 0, dil, 1, 1, 1, 1.0, 0, False)
                        if rule >= 1:
                            out = op.functional.ops.dcnv3_forward(x, offset.double(), mask.double(), *cpp_args)
                            assert out.shape[1] == rule
                        else:
                            with pytest.raises(RuntimeError, match="kernel footprint"):
                                op.functional.ops.dcnv3_forward(x, offset.double(), mask.double(), *cpp_args)
                        checked += 1
    assert checked == 7 * 4 * 3 * 2 * 2


# ---------------------------------------------------------------------------------------------------------------
# Non-contiguous tensors
# ---------------------------------------------------------------------------------------------------------------
def _strided(kind, x, offset, mask):
    if kind == "input-transposed":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    elif kind == "input-sliced":
        x = torch.cat([x, torch.full_like(x, NAN)], dim=-1)[..., : x.shape[-1]]
    elif kind == "offset-sliced":
        offset = torch.stack([offset, torch.full_like(offset, NAN)], dim=-1)[..., 0]
    elif kind == "mask-transposed":
        mask = mask.transpose(1, 2).contiguous().transpose(1, 2)
    elif kind == "mask-expanded":
        mask = mask[:1].expand_as(mask)
    elif kind == "all-channels-first":
        x, offset, mask = (t.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1) for t in (x, offset, mask))
    return x, offset, mask


STRIDED = [
    "input-transposed",
    "input-sliced",
    "offset-sliced",
    "mask-transposed",
    "mask-expanded",
    "all-channels-first",
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", STRIDED)
def test_non_contiguous_inputs(op, backend, kind):
    x, offset, mask, args = make_case(h=5, w=6)
    xs, os_, ms = _strided(kind, x, offset, mask)
    assert not all(t.is_contiguous() for t in (xs, os_, ms))
    x, offset, mask = (t.contiguous() for t in (xs, os_, ms))
    expected = run(backend, x, offset, mask, args)
    leaves = [t.detach().requires_grad_(True) for t in (xs, os_, ms)]
    out = run(backend, *leaves, args)
    assert torch.equal(out, expected)
    out.sum().backward()
    assert all(leaf.grad is not None and torch.isfinite(leaf.grad).all() for leaf in leaves)


# ---------------------------------------------------------------------------------------------------------------
# Random configurations: compiled vs reference, float64, outputs and gradients to 1e-12
# ---------------------------------------------------------------------------------------------------------------
def random_configs(count, seed=2026):
    rng = random.Random(seed)
    configs = []
    for i in range(count):
        kh, kw = rng.randint(1, 5), rng.randint(1, 5)
        rc = int(kh % 2 == 1 and kw % 2 == 1 and kh * kw > 1 and rng.random() < 0.4)
        configs.append(
            dict(
                n=rng.choice([1, 1, 2, 3]),
                h=rng.randint(1, 9),
                w=rng.randint(1, 9),
                group=rng.randint(1, 3),
                gc=rng.choice([1, 2, 3, 4, 5, 8, 16]),
                kh=kh,
                kw=kw,
                rc=rc,
                stride=(rng.randint(1, 3), rng.randint(1, 3)),
                pad=(rng.randint(0, 2), rng.randint(0, 2)),
                dil=(rng.randint(1, 2), rng.randint(1, 2)),
                scale=round(rng.uniform(0.25, 2.5), 3),
                offset_mag=rng.choice([0.0, 0.5, 2.0, 6.0]),
                seed=i,
            )
        )
    return configs


RANDOM = random_configs(48)


@pytest.mark.parametrize("cfg", RANDOM, ids=[f"cfg{i}" for i in range(len(RANDOM))])
def test_random_configurations_match(op, cfg):
    mask_softmax = cfg["seed"] % 3 == 0
    ho = dcnv3_output_size(cfg["h"], cfg["kh"], cfg["stride"][0], cfg["pad"][0], cfg["dil"][0])
    wo = dcnv3_output_size(cfg["w"], cfg["kw"], cfg["stride"][1], cfg["pad"][1], cfg["dil"][1])
    x, offset, mask, args = make_case(**cfg)
    if ho < 1 or wo < 1:
        for backend in BACKENDS:
            with pytest.raises(ValueError, match="smaller than the kernel footprint"):
                run(backend, x, offset, mask, args)
        return
    results = {}
    for backend in BACKENDS:
        leaves = [t.clone().requires_grad_(True) for t in (x, offset, mask)]
        out = run(backend, *leaves, args, mask_softmax=mask_softmax)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
        out.backward(grad_out)
        results[backend] = [out.detach()] + [leaf.grad for leaf in leaves]
    for name, a, b in zip(
        ("output", "grad input", "grad offset", "grad mask"), results["compiled"], results["reference"]
    ):
        assert rel_err(a, b) < 1e-12, name


def test_random_configurations_cover_the_cases():
    shapes = [
        (
            dcnv3_output_size(c["h"], c["kh"], c["stride"][0], c["pad"][0], c["dil"][0]),
            dcnv3_output_size(c["w"], c["kw"], c["stride"][1], c["pad"][1], c["dil"][1]),
        )
        for c in RANDOM
    ]
    assert sum(h < 1 or w < 1 for h, w in shapes) >= 3  # some empty outputs
    assert sum(h >= 1 and w >= 1 for h, w in shapes) >= 30
    assert any(c["rc"] for c in RANDOM) and any(c["gc"] == 16 for c in RANDOM)


# ---------------------------------------------------------------------------------------------------------------
# Child processes: the raw C++ ops, damaged and hostile kernel caches
# ---------------------------------------------------------------------------------------------------------------
def _child(script: str, argv: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    full_env.pop("INTERNIMAGE_DCNV3_BACKEND", None)
    full_env.pop("INTERNIMAGE_DCNV3_KERNEL_REPO", None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *argv],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _results(proc: subprocess.CompletedProcess) -> dict:
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            name, payload = line[len("RESULT ") :].split(" ", 1)
            out[name] = json.loads(payload)
    return out


RAW_OPS = [
    "zero points",
    "empty output 2x2 stride 2",
    "empty output 0x5",
    "offset_scale nan",
    "offset_scale inf",
    "negative stride",
    "huge kernel",
    "backward zero points",
    "backward empty output",
]


@pytest.fixture(scope="module")
def raw_op_results(kernel_dir):
    """Direct calls of the registered C++ ops (no Python checks in front): a RuntimeError each, never a signal."""
    script = """
        import json, sys, torch
        from pathlib import Path
        from internimage_hf.ops.loader import _import_variant
        ops = _import_variant(Path(sys.argv[1])).module.functional.ops
        x = torch.randn(1, 5, 5, 8, dtype=torch.float64)
        def om(h, w, p):  # offset and mask of (1, h, w) pixels, 2 groups of p points
            return torch.zeros(1, h, w, 4 * p, dtype=torch.float64), torch.zeros(1, h, w, 2 * p, dtype=torch.float64)
        fwd, bwd = ops.dcnv3_forward, ops.dcnv3_backward
        nan, inf = float("nan"), float("inf")
        cases = {
            "zero points": lambda: fwd(x, *om(5, 5, 0), 1, 1, 1, 1, 0, 0, 1, 1, 2, 4, 1.0, 1, False),
            "empty output 2x2 stride 2": lambda: fwd(x[:, :2, :2], *om(1, 1, 9), 3, 3, 2, 2, 0, 0, 1, 1, 2, 4, 1.0, 0,
                                                     False),
            "empty output 0x5": lambda: fwd(x[:, :0], *om(0, 5, 9), 3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0, 0, False),
            "offset_scale nan": lambda: fwd(x, *om(5, 5, 9), 3, 3, 1, 1, 1, 1, 1, 1, 2, 4, nan, 0, False),
            "offset_scale inf": lambda: fwd(x, *om(5, 5, 9), 3, 3, 1, 1, 1, 1, 1, 1, 2, 4, inf, 0, False),
            "negative stride": lambda: fwd(x, *om(5, 5, 9), 3, 3, -1, 1, 1, 1, 1, 1, 2, 4, 1.0, 0, False),
            "huge kernel": lambda: fwd(x, *om(5, 5, 9), 1 << 40, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0, 0, False),
            "backward zero points": lambda: bwd(x, x, *om(5, 5, 0), 1, 1, 1, 1, 0, 0, 1, 1, 2, 4, 1.0, 1, False),
            "backward empty output": lambda: bwd(x[:, :1, :1], x[:, :2, :2], *om(1, 1, 9), 3, 3, 2, 2, 0, 0, 1, 1, 2,
                                                 4, 1.0, 0, False),
        }
        for name, fn in cases.items():
            try:
                fn()
                result = {"raised": None}
            except Exception as err:
                result = {"raised": type(err).__name__, "message": str(err).splitlines()[0]}
            print("RESULT", name.replace(" ", "_"), json.dumps(result), flush=True)
    """
    proc = _child(script, [str(kernel_dir)])
    return proc, _results(proc)


@pytest.mark.parametrize("name", RAW_OPS)
def test_raw_cpp_ops_refuse_with_runtime_error(raw_op_results, name):
    proc, results = raw_op_results
    key = name.replace(" ", "_")
    assert key in results, f"child died before this case (exit {proc.returncode}): {proc.stderr[-2000:]}"
    assert results[key]["raised"] == "RuntimeError", results[key]
    assert "DCNv3" in results[key]["message"]


# Damaged / hostile copies of the session's build. Each entry: (id, damage, expected outcome), outcome "fallback"
# (one DCNv3KernelWarning, reference result, backend "compiled" raises RuntimeError) or "load" (the build loads
# under our namespaced module name and no sys.modules entry is replaced).
CACHE_CASES = [
    ("truncated library 50%", "truncate:0.5", "fallback"),
    ("truncated library 90%", "truncate:0.9", "fallback"),
    ("truncated library 0 bytes", "truncate:0", "fallback"),
    ("library with one byte flipped", "flip", "fallback"),
    ("library replaced by garbage", "garbage-lib", "fallback"),
    ("library missing", "rm:lib", "fallback"),
    ("second library under another suffix", "extra-lib", "fallback"),
    ("__init__.py missing", "rm:__init__.py", "fallback"),
    ("_ops.py missing", "rm:_ops.py", "fallback"),
    ("functional.py missing", "rm:functional.py", "fallback"),
    ("functional.py modified", "append:functional.py", "fallback"),
    ("metadata.json missing", "rm:metadata.json", "fallback"),
    ("metadata.json garbage", "meta-raw:{not json", "fallback"),
    ("metadata.json binary", "meta-raw:\x00\xff\x7fELF", "fallback"),
    ("metadata.json a list", "meta-raw:[1, 2]", "fallback"),
    ("metadata without id", "meta-del:id", "fallback"),
    ("metadata without build record", "meta-del:internimage_hf", "fallback"),
    ("build record not a dict", 'meta-record:"oops"', "fallback"),
    ("no file integrity record (older build)", "meta-record-del:files", "fallback"),
    ("file record escapes the folder", "meta-files-escape", "fallback"),
    ("wrong torch version recorded", "meta-record-set:torch=1.0.0", "fallback"),
    ("stale source digest", "meta-record-set:source_digest=" + "0" * 64, "fallback"),
    ("id ../x", "meta-set:id=../x", "fallback"),
    ("id with a dot", "meta-set:id=os.path", "fallback"),
    ("id empty", "meta-set:id=", "fallback"),
    ("id not a string", "meta-set-json:id=42", "fallback"),
    ("ext_name ../../evil", "meta-record-set:ext_name=../../evil", "fallback"),
    ("variant folder is a file", "not-a-folder", "fallback"),
    ("id os", "meta-set:id=os", "load"),
    ("id sys", "meta-set:id=sys", "load"),
    ("id torch", "meta-set:id=torch", "load"),
]

_CACHE_SCRIPT = r"""
import json, os, shutil, sys, warnings
from pathlib import Path
import torch
import internimage_hf
from internimage_hf.ops import dcnv3_core, dcnv3_core_reference, loader
from internimage_hf.ops.compiled import DCNv3KernelWarning

src, work, cases = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
originals = {name: sys.modules[name] for name in ("os", "sys", "torch", "json")}
x = torch.randn(1, 5, 6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
off = torch.randn(1, 5, 6, 36, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
msk = torch.rand(1, 5, 6, 18, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
args = (3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0, 0)
ref = dcnv3_core_reference(x, off, msk, *args)

def copy_build(dst):
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            if f.suffix in (".so", ".pyd"):
                # A link: every copy is the very library the process may already have mapped (dlopen dedups by
                # file), so that loading several copies never registers the op namespace twice.
                os.symlink(f, dst / f.name)
            else:
                shutil.copy2(f, dst / f.name)

def lib_of(dst):
    return next(p for p in dst.iterdir() if p.suffix in (".so", ".pyd"))

def rewrite(path, data):
    path.unlink()  # never write through the link into the shared build
    path.write_bytes(data)

def damage(dst, how):
    meta_path = dst / "metadata.json"
    meta = json.loads(meta_path.read_text())
    kind, _, arg = how.partition(":")
    if kind == "truncate":
        lib = lib_of(dst); data = lib.read_bytes(); rewrite(lib, data[: int(len(data) * float(arg))])
    elif kind == "flip":
        lib = lib_of(dst); data = bytearray(lib.read_bytes()); data[len(data) // 2] ^= 0xFF; rewrite(lib, bytes(data))
    elif kind == "garbage-lib":
        lib = lib_of(dst); rewrite(lib, b"\x7fELF garbage" * 100)
    elif kind == "rm":
        (lib_of(dst) if arg == "lib" else dst / arg).unlink()
    elif kind == "extra-lib":
        lib = lib_of(dst); (dst / (lib.name.split(".")[0] + ".cpython-311-x86_64-linux-gnu.so")).write_bytes(b"x")
    elif kind == "append":
        with open(dst / arg, "a") as f: f.write("\nraise SystemExit('tampered')\n")
    elif kind == "meta-raw":
        meta_path.write_bytes(arg.encode("latin-1"))
    elif kind == "meta-del":
        del meta[arg]; meta_path.write_text(json.dumps(meta))
    elif kind == "meta-set":
        key, _, value = arg.partition("="); meta[key] = value; meta_path.write_text(json.dumps(meta))
    elif kind == "meta-set-json":
        key, _, value = arg.partition("="); meta[key] = json.loads(value); meta_path.write_text(json.dumps(meta))
    elif kind == "meta-record":
        meta["internimage_hf"] = json.loads(arg); meta_path.write_text(json.dumps(meta))
    elif kind == "meta-record-del":
        del meta["internimage_hf"][arg]; meta_path.write_text(json.dumps(meta))
    elif kind == "meta-record-set":
        key, _, value = arg.partition("="); meta["internimage_hf"][key] = value; meta_path.write_text(json.dumps(meta))
    elif kind == "meta-files-escape":
        meta["internimage_hf"]["files"]["../../../etc/passwd"] = {"size": 1, "sha256": "0" * 64}
        meta_path.write_text(json.dumps(meta))
    elif kind == "not-a-folder":
        shutil.rmtree(dst); dst.write_text("oops")

for i, (name, how) in enumerate(cases):
    root = work / f"case{i}"
    dst = root / "build" / src.name
    result = {}
    try:
        copy_build(dst)
        damage(dst, how)
        os.environ["INTERNIMAGE_HF_KERNEL_CACHE"] = str(root)
        loader._reset()
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            out1 = dcnv3_core(x, off, msk, *args)
            out2 = dcnv3_core(x, off, msk, *args)
        ours = [str(w.message) for w in record if issubclass(w.category, DCNv3KernelWarning)]
        status = loader.kernel_status()
        result = {"warnings": ours, "source": status["source"], "problems": status["problems"],
                  "matches_reference": bool(torch.allclose(out1, ref, rtol=1e-12, atol=1e-12)
                                            and torch.equal(out1, out2)),
                  "modules_intact": all(sys.modules[k] is v for k, v in originals.items()),
                  "stray_modules": sorted(k for k in sys.modules if ".." in k or "/" in k)}
        try:
            dcnv3_core(x, off, msk, *args, backend="compiled")
            result["compiled"] = "ran"
        except RuntimeError as err:
            result["compiled"] = "RuntimeError: " + str(err)[:200]
    except BaseException as err:
        result = {"error": f"{type(err).__name__}: {err}"}
    print("RESULT", f"case{i}", json.dumps(result), flush=True)
"""


@pytest.fixture(scope="module")
def cache_results(kernel_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("faulty-caches")
    cases = [(name, how) for name, how, _ in CACHE_CASES]
    proc = subprocess.run(
        [sys.executable, "-c", _CACHE_SCRIPT, str(kernel_dir), str(work), json.dumps(cases)],
        env=dict(
            os.environ,
            HF_HUB_OFFLINE="1",
            PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc, _results(proc)


@pytest.mark.parametrize("index", range(len(CACHE_CASES)), ids=[c[0] for c in CACHE_CASES])
def test_damaged_or_hostile_cache(cache_results, kernel_dir, index):
    proc, results = cache_results
    name, _, outcome = CACHE_CASES[index]
    result = results.get(f"case{index}")
    assert result is not None, (
        f"the child process died before or during this case (exit {proc.returncode}, "
        f"a negative exit is a signal): {proc.stderr[-3000:]}"
    )
    assert "error" not in result, result
    assert result["matches_reference"], result
    assert result["modules_intact"] and not result["stray_modules"], result
    if outcome == "fallback":
        assert result["source"] is None, result
        assert len(result["warnings"]) == 1 and "build-kernels" in result["warnings"][0], result
        assert result["compiled"].startswith("RuntimeError"), result
    else:
        assert result["source"] is not None and result["source"].startswith("local build"), result
        assert result["warnings"] == [] and result["compiled"] == "ran", result
