"""The compiled DCNv3 kernels (csrc/): built once per session, checked against the fixtures and the reference.

The kernel is built with `build_kernels()` into $INTERNIMAGE_HF_KERNEL_CACHE (or the default cache, where an
up-to-date build is reused). Without a C++ compiler these tests are skipped; with one, a failed build fails them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from internimage_hf.ops import dcnv3_core, dcnv3_core_reference, loader
from internimage_hf.ops.build import build_kernels, default_cache_dir, read_metadata, source_dir, torch_variant
from internimage_hf.ops.compiled import DCNv3KernelWarning

from .conftest import rel_err

REPO = Path(__file__).resolve().parents[1]


def out_size(size, k, stride, pad, dil):
    return (size + 2 * pad - (dil * (k - 1) + 1)) // stride + 1


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
    offset_mag=2.0,
    dtype=torch.float64,
    seed=0,
):
    g = torch.Generator().manual_seed(seed)
    points = kh * kw - rc
    ho, wo = out_size(h, kh, stride[0], pad[0], dil[0]), out_size(w, kw, stride[1], pad[1], dil[1])
    x = torch.randn(n, h, w, group * gc, generator=g, dtype=torch.float64)
    offset = offset_mag * torch.randn(n, ho, wo, group * points * 2, generator=g, dtype=torch.float64)
    mask = torch.randn(n, ho, wo, group, points, generator=g, dtype=torch.float64).softmax(-1).flatten(-2)
    args = (kh, kw, stride[0], stride[1], pad[0], pad[1], dil[0], dil[1], group, gc, scale, rc)
    return x.to(dtype), offset.to(dtype), mask.to(dtype), args


def grads(fn, x, offset, mask, args, grad_out=None):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, offset, mask)]
    out = fn(*leaves, *args)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


# ---------------------------------------------------------------------------------------------------------------
# Fixtures of the official operator
# ---------------------------------------------------------------------------------------------------------------
def official_cases(fixtures_dir):
    cases = load_file(fixtures_dir / "dcnv3_op_cases.safetensors")
    for i in range(5):
        p = cases[f"case{i}.params"].tolist()
        args = tuple(p[:10]) + (cases[f"case{i}.offset_scale"].item(), p[10])
        yield (
            i,
            cases[f"case{i}.input"],
            cases[f"case{i}.offset"],
            cases[f"case{i}.mask"],
            args,
            cases[f"case{i}.output"],
        )


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_official_op_cases(kernel, fixtures_dir, dtype, tol):
    for i, x, offset, mask, args, expected in official_cases(fixtures_dir):
        out = kernel.dcnv3_core(x.to(dtype), offset.to(dtype), mask.to(dtype), *args)
        assert out.dtype == dtype and out.shape == expected.shape
        assert rel_err(out, expected) < tol, f"case {i}: {rel_err(out, expected):.3g}"


def test_official_cases_gradients_match_reference(kernel, fixtures_dir):
    for i, x, offset, mask, args, _ in official_cases(fixtures_dir):
        _, g_ref = grads(dcnv3_core_reference, x, offset, mask, args)
        _, g_op = grads(kernel.dcnv3_core, x, offset, mask, args)
        for name, a, b in zip(("input", "offset", "mask"), g_op, g_ref):
            assert rel_err(a, b) < 1e-12, f"case {i} grad {name}"


# ---------------------------------------------------------------------------------------------------------------
# Property-based comparison with the reference (float64 reference is the oracle)
# ---------------------------------------------------------------------------------------------------------------
@st.composite
def op_params(draw):
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    rc = draw(st.integers(0, 1)) if (kh % 2 and kw % 2 and kh * kw > 1) else 0
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    pad = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    dil = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    assume(out_size(h, kh, stride[0], pad[0], dil[0]) >= 1 and out_size(w, kw, stride[1], pad[1], dil[1]) >= 1)
    return dict(
        n=draw(st.integers(1, 3)),
        h=h,
        w=w,
        group=draw(st.integers(1, 4)),
        gc=draw(st.sampled_from([1, 2, 3, 5, 8, 9, 16, 17, 32])),
        kh=kh,
        kw=kw,
        stride=stride,
        pad=pad,
        dil=dil,
        rc=rc,
        scale=draw(st.sampled_from([0.5, 1.0, 1.5, 2.0, 0.37])),
        offset_mag=draw(st.sampled_from([0.3, 1.0, 3.0, 12.0, 60.0])),
        seed=draw(st.integers(0, 2**16)),
    )


def assert_close(a, b, tol, what):
    scale = b.abs().max().item() if b.numel() else 0.0
    err = (a.double() - b.double()).abs().max().item() if b.numel() else 0.0
    assert err <= tol * (1.0 + scale), f"{what}: max abs err {err:.3g} (scale {scale:.3g})"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(params=op_params())
def test_random_shapes_forward_backward_float64(kernel, params):
    x, offset, mask, args = make_case(**params)
    out_ref, g_ref = grads(dcnv3_core_reference, x, offset, mask, args)
    out, g = grads(kernel.dcnv3_core, x, offset, mask, args)
    assert_close(out, out_ref, 1e-12, "output")
    for name, a, b in zip(("input", "offset", "mask"), g, g_ref):
        assert_close(a, b, 1e-11, f"grad {name}")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(params=op_params(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_random_shapes_low_precision(kernel, params, dtype):
    x, offset, mask, args = make_case(**params, dtype=dtype)
    out_ref, g_ref = grads(dcnv3_core_reference, x, offset, mask, args)
    out, g = grads(kernel.dcnv3_core, x, offset, mask, args)
    assert out.dtype == dtype and all(t.dtype == dtype for t in g)
    # Same inputs, computed in float32 both ways: differences are float32 rounding (bf16 outputs may then round to
    # the neighbouring bf16 value).
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close(out, out_ref, tol, "output")
    for name, a, b in zip(("input", "offset", "mask"), g, g_ref):
        assert_close(a, b, tol * 4, f"grad {name}")


def with_logits(x, offset, mask, args, magnitude, seed):
    """The case with mask logits (random, of the given magnitude) instead of normalised masks."""
    g = torch.Generator().manual_seed(seed + 7)
    logits = magnitude * torch.randn(mask.shape, generator=g, dtype=torch.float64)
    return x, offset, logits.to(mask.dtype), args


def fused_reference(x, offset, logits, *args):
    return dcnv3_core_reference(x, offset, logits, *args, mask_softmax=True)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(
    params=op_params(),
    magnitude=st.sampled_from([0.3, 3.0, 30.0, 300.0]),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
)
def test_fused_mask_softmax_matches_reference(kernel, params, magnitude, dtype):
    """mask_softmax=True (softmax over each pixel and group's points inside the kernel, gradients to the logits)
    against softmax-then-op in the reference; large magnitudes drive most exponentials to underflow."""
    x, offset, logits, args = with_logits(*make_case(**params, dtype=dtype), magnitude, params["seed"])
    out_ref, g_ref = grads(fused_reference, x, offset, logits, args)
    out, g = grads(lambda *a: kernel.dcnv3_core(*a, True), x, offset, logits, args)
    assert out.dtype == dtype and all(t.dtype == dtype for t in g)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    assert_close(out, out_ref, tol, "output")
    for name, a, b in zip(("input", "offset", "logits"), g, g_ref):
        assert_close(a, b, tol * 10 if dtype == torch.float64 else tol * 4, f"grad {name}")


@pytest.mark.parametrize("params", [dict(), dict(kh=5, kw=5, pad=(2, 2), rc=1, scale=2.0), dict(gc=16, group=3)])
def test_gradcheck_fused_mask_softmax(kernel, params):
    x, offset, logits, args = with_logits(*make_case(n=1, h=4, w=5, **params), 2.0, 0)
    offset = offsets_off_the_kinks(offset, args[10])
    inputs = tuple(t.clone().requires_grad_(True) for t in (x, offset, logits))
    assert torch.autograd.gradcheck(
        lambda a, b, c: kernel.dcnv3_core(a, b, c, *args, True), inputs, eps=1e-6, atol=1e-7, rtol=1e-5
    )


def test_kernel_without_fused_softmax_gets_softmaxed_masks(use_kernel, monkeypatch):
    """A kernel built before mask_softmax existed (no "mask_softmax" in FEATURES) still serves mask_softmax calls:
    the softmax then runs in Python first."""
    op = loader.get_compiled_op(required=True)
    x, offset, logits, args = with_logits(*make_case(dtype=torch.float32), 3.0, 0)
    expected = fused_reference(x, offset, logits, *args)
    monkeypatch.setattr(op, "fuses_mask_softmax", False)
    calls = []
    monkeypatch.setattr(op, "_core", lambda *a: calls.append(len(a)) or use_kernel.dcnv3_core(*a))
    out = dcnv3_core(x, offset, logits, *args, mask_softmax=True, backend="compiled")
    assert calls == [15]  # official arguments only: no mask_softmax flag reached the old kernel
    assert rel_err(out, expected) < 1e-6


def offsets_off_the_kinks(offset, scale):
    """Offsets whose samples sit 0.15..0.85 px from every pixel row/column (bilinear has kinks at integers)."""
    frac = 0.15 + 0.7 * torch.rand(offset.shape, generator=torch.Generator().manual_seed(3), dtype=offset.dtype)
    return (offset.round() + frac) / scale


@pytest.mark.parametrize(
    "params",
    [
        dict(),
        dict(stride=(2, 1), pad=(0, 2)),
        dict(kh=5, kw=5, pad=(2, 2), rc=1, scale=2.0),
        dict(kh=3, kw=1, dil=(2, 3), pad=(2, 0), group=3, gc=2),
        dict(kh=1, kw=1, pad=(0, 0), group=1, gc=3, offset_mag=6.0),
        dict(gc=16, group=1, h=4, w=4),
    ],
)
def test_gradcheck_float64(kernel, params):
    x, offset, mask, args = make_case(n=1, h=params.pop("h", 4), w=params.pop("w", 5), **params)
    offset = offsets_off_the_kinks(offset, args[10])
    inputs = tuple(t.clone().requires_grad_(True) for t in (x, offset, mask))
    assert torch.autograd.gradcheck(
        lambda a, b, c: kernel.dcnv3_core(a, b, c, *args), inputs, eps=1e-6, atol=1e-7, rtol=1e-5
    )


# ---------------------------------------------------------------------------------------------------------------
# Scheduling: every instruction-set variant, batch size, thread count, determinism, odd layouts
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gc", [16, 32, 7])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_every_cpu_isa_variant(kernel, gc, dtype):
    x, offset, mask, args = make_case(n=2, h=9, w=8, group=3, gc=gc, offset_mag=3.0, dtype=dtype)
    out_ref, g_ref = grads(dcnv3_core_reference, x, offset, mask, args)
    best = kernel.cpu_isa()
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    try:
        for level in range(best + 1):
            assert kernel.cpu_isa(level) == level
            out, g = grads(kernel.dcnv3_core, x, offset, mask, args)
            assert_close(out, out_ref, tol, f"isa {level} output")
            for name, a, b in zip(("input", "offset", "mask"), g, g_ref):
                assert_close(a, b, 4 * tol, f"isa {level} grad {name}")
    finally:
        kernel.cpu_isa(best)


def test_batch_300(kernel):
    x, offset, mask, args = make_case(n=300, h=5, w=4, group=2, gc=8, dtype=torch.float32)
    out_ref, g_ref = grads(dcnv3_core_reference, x, offset, mask, args)
    out, g = grads(kernel.dcnv3_core, x, offset, mask, args)
    assert out.shape[0] == 300
    assert rel_err(out, out_ref) < 1e-6
    for a, b in zip(g, g_ref):
        assert rel_err(a, b) < 1e-5


def test_backward_is_deterministic(kernel):
    x, offset, mask, args = make_case(n=2, h=12, w=12, group=4, gc=16, offset_mag=1.5, dtype=torch.float32)
    _, first = grads(kernel.dcnv3_core, x, offset, mask, args)
    threads = torch.get_num_threads()
    try:
        for n_threads in {1, 2, threads}:  # N * G = 8 tasks: the summation order never depends on the threads
            torch.set_num_threads(n_threads)
            for _ in range(2):
                _, again = grads(kernel.dcnv3_core, x, offset, mask, args)
                assert all(torch.equal(a, b) for a, b in zip(first, again))
    finally:
        torch.set_num_threads(threads)


def test_fewer_tasks_than_threads_still_correct(kernel):
    """N * G = 1: each (image, group) pair is cut into pixel slices with separate buffers."""
    x, offset, mask, args = make_case(n=1, h=10, w=9, group=1, gc=8, dtype=torch.float64)
    _, g_ref = grads(dcnv3_core_reference, x, offset, mask, args)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, threads))
        _, g = grads(kernel.dcnv3_core, x, offset, mask, args)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(g, g_ref):
        assert_close(a, b, 1e-12, "grad")


def test_non_contiguous_and_mixed_dtype_inputs(kernel):
    x, offset, mask, args = make_case(n=2, h=6, w=5, group=2, gc=4, dtype=torch.float32)
    ref = dcnv3_core_reference(x, offset, mask, *args)
    x_nc = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    assert not x_nc.is_contiguous()
    out = kernel.dcnv3_core(x_nc, offset.double(), mask.double(), *args)  # offset/mask follow input's dtype
    assert out.dtype == torch.float32 and rel_err(out, ref) < 1e-6


def test_samples_far_outside_read_zeros(kernel):
    x, offset, mask, args = make_case(dtype=torch.float32)
    for big in (1e6, -1e6, 1e30):
        out = kernel.dcnv3_core(x, torch.full_like(offset, big), mask, *args)
        assert torch.equal(out, torch.zeros_like(out))
    # Non-finite offsets are not "far outside": NaN, as in the reference (grid_sample's weights are NaN there).
    for bad in (float("inf"), float("-inf"), float("nan")):
        out = kernel.dcnv3_core(x, torch.full_like(offset, bad), mask, *args)
        ref = dcnv3_core_reference(x, torch.full_like(offset, bad), mask, *args)
        assert out.isnan().all() and ref.isnan().all()


@pytest.mark.parametrize("gc", [16, 5])  # the register-group path (released widths) and the generic one
def test_non_finite_pixels_never_leak_into_samples_that_do_not_read_them(kernel, gc):
    """Corners outside the image are read from a clamped (border) address and dropped: an inf or NaN there must
    vanish, as in the reference, which never reads them."""
    x, offset, mask, args = make_case(h=12, w=13, gc=gc, dtype=torch.float64, offset_mag=1.0)
    x[:, 0], x[:, -1] = float("inf"), float("nan")
    x[:, :, 0], x[:, :, -1] = float("-inf"), float("nan")
    far = kernel.dcnv3_core(x, torch.full_like(offset, 1e6), mask, *args)
    assert torch.equal(far, torch.zeros_like(far))
    out, ref = kernel.dcnv3_core(x, offset, mask, *args), dcnv3_core_reference(x, offset, mask, *args)
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), finite) and 0 < finite.float().mean() < 1
    assert_close(out[finite], ref[finite], 1e-12, "finite outputs")


def test_zero_offsets_match_reference_including_gradients(kernel):
    """Samples on exact pixel positions (the state of an initialised model)."""
    x, offset, mask, args = make_case(n=2, h=7, w=6, group=2, gc=8)
    offset = torch.zeros_like(offset)
    out_ref, g_ref = grads(dcnv3_core_reference, x, offset, mask, args)
    out, g = grads(kernel.dcnv3_core, x, offset, mask, args)
    assert_close(out, out_ref, 1e-12, "output")
    for name, a, b in zip(("input", "offset", "mask"), g, g_ref):
        assert_close(a, b, 1e-11, f"grad {name}")


def test_bad_arguments_raise(kernel):
    x, offset, mask, args = make_case()
    with pytest.raises(RuntimeError, match="offset must have shape"):
        kernel.dcnv3_core(x, offset[..., :-1], mask, *args)
    with pytest.raises(RuntimeError, match="group \\* group_channels"):
        kernel.dcnv3_core(x, offset, mask, *args[:8], 3, *args[9:])


# ---------------------------------------------------------------------------------------------------------------
# torch.compile, the dispatcher, the Hub layer, loading through `kernels`
# ---------------------------------------------------------------------------------------------------------------
def test_torch_compile_fullgraph_matches_eager(use_kernel):
    x, offset, mask, args = make_case(n=2, h=8, w=8, group=4, gc=4, dtype=torch.float32)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    def f(a, b, c):
        return (dcnv3_core(a, b, c, *args, backend="compiled") * 2.0).sin()

    compiled = torch.compile(f, backend=recording_backend, fullgraph=True)
    out_c, g_c = grads(lambda a, b, c, *_: compiled(a, b, c), x, offset, mask, args)
    out_e, g_e = grads(lambda a, b, c, *_: f(a, b, c), x, offset, mask, args)
    assert any("dcnv3_forward" in g for g in graphs), "the compiled op is not in the traced graph"
    assert torch.allclose(out_c, out_e, atol=1e-6)
    for a, b in zip(g_c, g_e):
        assert torch.allclose(a, b, atol=1e-5)


def test_torch_compile_inductor(use_kernel):
    x, offset, mask, args = make_case(n=1, h=6, w=6, group=2, gc=4, dtype=torch.float32)
    f = lambda a, b, c: dcnv3_core(a, b, c, *args).relu()  # noqa: E731
    out_c, g_c = grads(lambda a, b, c, *_: torch.compile(f, fullgraph=True)(a, b, c), x, offset, mask, args)
    out_e, g_e = grads(lambda a, b, c, *_: f(a, b, c), x, offset, mask, args)
    assert torch.allclose(out_c, out_e, atol=1e-6)
    for a, b in zip(g_c, g_e):
        assert torch.allclose(a, b, atol=1e-5)


def test_backend_switching(use_kernel, monkeypatch):
    x, offset, mask, args = make_case(dtype=torch.float32)
    ref = dcnv3_core_reference(x, offset, mask, *args)
    calls = []
    original = loader.CompiledDCNv3.__call__
    monkeypatch.setattr(
        loader.CompiledDCNv3, "__call__", lambda self, *a, **kw: calls.append(1) or original(self, *a, **kw)
    )
    outs = {b: dcnv3_core(x, offset, mask, *args, backend=b) for b in ("auto", "compiled", "reference")}
    assert len(calls) == 2  # auto and compiled used the kernel, reference did not
    for out in outs.values():
        assert rel_err(out, ref) < 1e-6
    monkeypatch.setenv("INTERNIMAGE_DCNV3_BACKEND", "reference")
    dcnv3_core(x, offset, mask, *args)
    assert len(calls) == 2
    monkeypatch.setenv("INTERNIMAGE_DCNV3_BACKEND", "compiled")
    dcnv3_core(x, offset, mask, *args)
    assert len(calls) == 3


def test_float16_on_cpu_uses_reference_silently(use_kernel):
    x, offset, mask, args = make_case(dtype=torch.float16)
    assert not loader.get_compiled_op().supports(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = dcnv3_core(x, offset, mask, *args)
    assert out.dtype == torch.float16
    assert torch.equal(out, dcnv3_core_reference(x, offset, mask, *args))


def test_hub_layer_contract(kernel):
    layer_cls = kernel.layers.DCNv3Core
    assert "__init__" not in vars(layer_cls)
    assert layer_cls.has_backward is True and layer_cls.can_torch_compile is True
    import inspect

    from internimage_hf.ops import DCNv3Core

    assert list(inspect.signature(layer_cls.forward).parameters) == list(
        inspect.signature(DCNv3Core.forward).parameters
    )
    x, offset, mask, args = make_case(dtype=torch.float32)
    assert rel_err(layer_cls()(x, offset, mask, *args), dcnv3_core_reference(x, offset, mask, *args)) < 1e-6


def test_metadata_and_layout(kernel_dir):
    assert kernel_dir.name == torch_variant(cuda=False)
    meta = read_metadata(kernel_dir)
    for key in ("id", "name", "version", "license", "python-depends", "backend"):
        assert key in meta
    assert meta["backend"]["type"] == "cpu"
    for name in ("__init__.py", "layers.py", "_ops.py", "metadata.json"):
        assert (kernel_dir / name).is_file()


def test_local_build_runs_on_torch_threads(kernel, kernel_dir):
    """at::parallel_for is inline code: compiled without OpenMP it silently runs on one thread (the kernel did, until
    the build passed -fopenmp). The library must call into OpenMP, and into the same runtime as torch (whose thread
    pool torch.set_num_threads sizes), not a second copy."""
    import ctypes

    if torch.__config__.parallel_info().find("parallel backend: OpenMP") < 0:
        pytest.skip("this torch does not use the OpenMP backend")
    libs = [p for p in kernel_dir.iterdir() if p.suffix in {".so", ".pyd"}]
    assert libs and all(b"GOMP_parallel" in lib.read_bytes() for lib in libs)
    if not sys.platform.startswith("linux"):
        return
    torch_lib = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    if not torch_lib.exists():
        pytest.skip("libtorch_cpu.so not found")

    def resolved(path):  # address the dynamic linker bound omp_get_max_threads to, seen from that library
        return ctypes.cast(ctypes.CDLL(str(path)).omp_get_max_threads, ctypes.c_void_p).value

    assert resolved(libs[0]) == resolved(torch_lib)


def test_get_local_kernel_loads_the_build(kernel_dir):
    kernels = pytest.importorskip("kernels")
    module = kernels.get_local_kernel(kernel_dir.parents[1], backend="cpu")
    x, offset, mask, args = make_case(dtype=torch.float32)
    assert rel_err(module.dcnv3_core(x, offset, mask, *args), dcnv3_core_reference(x, offset, mask, *args)) < 1e-6
    assert module.layers.DCNv3Core.has_backward


def test_get_local_kernel_after_a_forward_in_a_fresh_process(kernel_dir):
    """A model forward loads the build through our loader first; `kernels` must still load it afterwards (kernels
    0.19 refused a build whose metadata id was already in sys.modules), both loads must agree, and executing the
    package twice must neither re-register nor override the autograd formula and fake implementation."""
    pytest.importorskip("kernels")
    script = textwrap.dedent("""
        import sys, warnings
        from pathlib import Path
        import torch
        import internimage_hf, kernels
        from internimage_hf.ops import dcnv3_core_reference, loader
        warnings.simplefilter("error")  # an "Overriding a previously registered kernel" warning fails the test
        config = internimage_hf.InternImageConfig(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8],
                                                  num_labels=3)
        model = internimage_hf.InternImageForImageClassification(config).eval()
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
        ours = loader.get_compiled_op(required=True).module
        theirs = kernels.get_local_kernel(Path(sys.argv[1]), backend="cpu")
        assert ours is not theirs and ours.__name__ != theirs.__name__, (ours.__name__, theirs.__name__)
        assert ours.__name__.startswith(loader.MODULE_PREFIX) and sys.modules[theirs.__name__] is theirs
        assert ours.functional.ops is theirs.functional.ops  # one op namespace: the same compiled library
        x = torch.randn(2, 5, 6, 8, dtype=torch.float64, requires_grad=True)
        off = torch.randn(2, 5, 6, 36, dtype=torch.float64, requires_grad=True)
        m = torch.rand(2, 5, 6, 18, dtype=torch.float64, requires_grad=True)
        args = (3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0, 0)
        grads = []
        for fn in (ours.dcnv3_core, theirs.dcnv3_core, dcnv3_core_reference):
            out = fn(x, off, m, *args)
            grads.append([out.detach()] + list(torch.autograd.grad(out.square().sum(), (x, off, m))))
        for a, b, c in zip(*grads):
            assert torch.equal(a, b) and torch.allclose(a, c, rtol=1e-12, atol=1e-12)
        compiled = torch.compile(theirs.dcnv3_core, fullgraph=True, backend="eager")
        assert torch.equal(compiled(x, off, m, *args), grads[0][0])
        assert kernels.get_local_kernel(Path(sys.argv[1]), backend="cpu") is theirs  # and again: reused
        print("OK")
    """)
    env = dict(
        os.environ,
        INTERNIMAGE_HF_KERNEL_CACHE=str(kernel_dir.parents[1]),
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    )
    env.pop("INTERNIMAGE_DCNV3_BACKEND", None)
    env.pop("INTERNIMAGE_DCNV3_KERNEL_REPO", None)
    proc = subprocess.run(
        [sys.executable, "-c", script, str(kernel_dir.parents[1])], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


def test_kernelize_swaps_the_layer_into_a_model(kernel_dir, monkeypatch):
    """`kernels.kernelize` with a LocalLayerRepository replaces the model's DCNv3Core forward by the kernel's layer."""
    kernels = pytest.importorskip("kernels")
    import internimage_hf
    from internimage_hf.ops import DCNv3Core

    monkeypatch.setenv("INTERNIMAGE_DCNV3_BACKEND", "reference")  # the model's own forward: the reference op
    config = internimage_hf.InternImageConfig(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8], num_labels=3)
    model = internimage_hf.InternImageForImageClassification(config).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x).logits
    kernels.replace_kernel_forward_from_hub(DCNv3Core, "DCNv3Core")
    repo = kernels.LocalLayerRepository(repo_path=kernel_dir.parents[1], layer_name="DCNv3Core")
    with kernels.use_kernel_mapping({"DCNv3Core": {"cpu": repo}}):
        model = kernels.kernelize(model, mode=kernels.Mode.INFERENCE, device="cpu")
    cores = [m for m in model.modules() if isinstance(m, DCNv3Core)]
    assert cores and all(m.forward.__func__.__module__.endswith(".layers") for m in cores)
    with torch.no_grad():
        assert rel_err(model(x).logits, expected) < 1e-5


def test_hub_path_through_local_kernels_override(kernel_dir, monkeypatch):
    """The Hub path (kernels.get_kernel) exercised offline by pointing LOCAL_KERNELS at the build."""
    pytest.importorskip("kernels")
    repo = "internimage-hf-test/internimage-dcnv3"
    monkeypatch.setenv("LOCAL_KERNELS", f"{repo}={kernel_dir.parents[1]}")
    monkeypatch.setenv("INTERNIMAGE_DCNV3_KERNEL_REPO", repo)
    monkeypatch.setenv("INTERNIMAGE_HF_KERNEL_CACHE", str(kernel_dir.parents[1] / "no-such-cache"))
    loader._reset()
    try:
        op = loader.get_compiled_op(required=True)
        assert op.source.startswith(f"Hub kernel {repo}")
        x, offset, mask, args = make_case(dtype=torch.float32)
        assert rel_err(dcnv3_core(x, offset, mask, *args), dcnv3_core_reference(x, offset, mask, *args)) < 1e-6
    finally:
        loader._reset()


def test_unavailable_hub_kernel_falls_back_to_local_build_with_one_warning(kernel_dir, monkeypatch):
    monkeypatch.setenv("INTERNIMAGE_DCNV3_KERNEL_REPO", "internimage-hf-test/not-a-kernel")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LOCAL_KERNELS", raising=False)
    monkeypatch.setenv("INTERNIMAGE_HF_KERNEL_CACHE", str(kernel_dir.parents[1]))
    loader._reset()
    try:
        x, offset, mask, args = make_case(dtype=torch.float32)
        with pytest.warns(DCNv3KernelWarning, match="not-a-kernel") as record:
            dcnv3_core(x, offset, mask, *args)
            dcnv3_core(x, offset, mask, *args)
        assert len([w for w in record if issubclass(w.category, DCNv3KernelWarning)]) == 1
        assert loader.get_compiled_op().source.startswith("local build")
    finally:
        loader._reset()


# ---------------------------------------------------------------------------------------------------------------
# Fallback: missing / broken / stale builds never break a forward pass; one warning says why and how to fix it
# ---------------------------------------------------------------------------------------------------------------
def _break(kind: str, root: Path, kernel_dir: Path) -> None:
    if kind == "missing":
        root.mkdir(parents=True, exist_ok=True)
        return
    target = root / "build" / kernel_dir.name
    shutil.copytree(kernel_dir, target)
    meta = json.loads((target / "metadata.json").read_text())
    meta["id"] += "_copy"  # another build, as far as Python's module cache is concerned
    (target / "metadata.json").write_text(json.dumps(meta))
    if kind == "corrupt-metadata":
        (target / "metadata.json").write_text("{not json")
    elif kind == "corrupt-library":
        for lib in target.glob("*.so"):
            lib.write_bytes(b"\x7fELF garbage")
    elif kind == "stale":
        meta["internimage_hf"]["source_digest"] = "0" * 64
        (target / "metadata.json").write_text(json.dumps(meta))
    elif kind == "not-a-folder":
        shutil.rmtree(target)
        target.write_text("oops")


@pytest.mark.parametrize("kind", ["missing", "corrupt-metadata", "corrupt-library", "stale", "not-a-folder"])
def test_broken_cache_falls_back_with_one_warning(kernel_dir, tmp_path, monkeypatch, kind):
    root = tmp_path / "cache"
    _break(kind, root, kernel_dir)
    monkeypatch.setenv("INTERNIMAGE_HF_KERNEL_CACHE", str(root))
    monkeypatch.delenv("INTERNIMAGE_DCNV3_KERNEL_REPO", raising=False)
    monkeypatch.delenv("INTERNIMAGE_DCNV3_BACKEND", raising=False)
    loader._reset()
    try:
        x, offset, mask, args = make_case(dtype=torch.float32)
        with pytest.warns(DCNv3KernelWarning, match="build-kernels") as record:
            out1 = dcnv3_core(x, offset, mask, *args)
            out2 = dcnv3_core(x, offset, mask, *args)
        assert len([w for w in record if issubclass(w.category, DCNv3KernelWarning)]) == 1
        ref = dcnv3_core_reference(x, offset, mask, *args)
        assert torch.equal(out1, ref) and torch.equal(out2, ref)
        with pytest.raises(RuntimeError, match="build-kernels"):
            dcnv3_core(x, offset, mask, *args, backend="compiled")
    finally:
        loader._reset()


def test_fresh_process_offline_without_build(tmp_path):
    """A new process, HF_HUB_OFFLINE=1, an empty cache and a Hub repo configured: import works, forward works on
    the reference, exactly one warning; nothing is built or downloaded at import time."""
    script = textwrap.dedent("""
        import warnings, torch
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as record:
            import internimage_hf
            from internimage_hf.ops import dcnv3_core, dcnv3_core_reference
            assert not list((__import__("pathlib").Path(r"%s")).rglob("*")), "something was written at import"
            x = torch.randn(1, 5, 5, 8); off = torch.randn(1, 5, 5, 36); m = torch.rand(1, 5, 5, 18)
            for _ in range(3):
                out = dcnv3_core(x, off, m, 3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0, 0)
            assert torch.equal(out, dcnv3_core_reference(x, off, m, 3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0, 0))
        ours = [w for w in record if type(w.message).__name__ == "DCNv3KernelWarning"]
        assert len(ours) == 1, [str(w.message) for w in record]
        print("MESSAGE", ours[0].message)
    """) % (tmp_path / "cache")
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        INTERNIMAGE_HF_KERNEL_CACHE=str(tmp_path / "cache"),
        INTERNIMAGE_DCNV3_KERNEL_REPO="internimage-hf-test/internimage-dcnv3",
        PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    )
    env.pop("INTERNIMAGE_DCNV3_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "build-kernels" in proc.stdout


def test_build_reuses_an_up_to_date_build(kernel_dir):
    before = read_metadata(kernel_dir)["id"]
    assert build_kernels(cache_dir=kernel_dir.parents[1], cuda=False) == kernel_dir
    assert read_metadata(kernel_dir)["id"] == before


def test_sources_found_and_default_cache(monkeypatch, tmp_path):
    src = source_dir()  # the repository's csrc/ in a checkout, internimage_hf/csrc in a wheel
    assert src is not None and (src / "build.toml").is_file() and (src / "dcnv3_common" / "dcnv3_math.h").is_file()
    monkeypatch.setenv("INTERNIMAGE_HF_KERNEL_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("INTERNIMAGE_HF_KERNEL_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "internimage_hf" / "kernels"


# ---------------------------------------------------------------------------------------------------------------
# The full model on the compiled op (official fixtures)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["tiny_t", "tiny_h"])
def test_model_on_compiled_op_matches_official(use_kernel, fixtures_dir, tmp_path, monkeypatch, case):
    from transformers import AutoModelForImageClassification

    from internimage_hf.cli import main as cli_main

    out = tmp_path / "model"
    assert (
        cli_main(
            [
                "convert",
                str(fixtures_dir / case / "checkpoint.pth"),
                str(out),
                "--official-config",
                str(fixtures_dir / case / "official_config.json"),
            ]
        )
        == 0
    )
    expected = load_file(fixtures_dir / case / "expected.safetensors")
    model = AutoModelForImageClassification.from_pretrained(out).eval()
    logits = {}
    for backend in ("compiled", "reference"):
        monkeypatch.setenv("INTERNIMAGE_DCNV3_BACKEND", backend)
        with torch.no_grad():
            logits[backend] = model(expected["pixel_values"]).logits
    assert rel_err(logits["compiled"], expected["logits"]) < 1e-5
    assert rel_err(logits["compiled"], logits["reference"]) < 1e-5


def test_torch_compile_of_the_model_matches_eager(use_kernel, fixtures_dir):
    """torch.compile traces the whole model through the DCNv3 custom op (fake implementation) and agrees with eager."""
    from internimage_hf.convert import model_from_official, read_official_config

    case = fixtures_dir / "tiny_t"
    model = model_from_official(
        torch.load(case / "checkpoint.pth", weights_only=True)["model"],
        read_official_config(case / "official_config.json"),
    ).eval()
    x = load_file(case / "expected.safetensors")["pixel_values"]
    with torch.no_grad():
        eager = model(x).logits
        compiled = torch.compile(model, fullgraph=True)(x).logits
    assert rel_err(compiled, eager) < 1e-5
