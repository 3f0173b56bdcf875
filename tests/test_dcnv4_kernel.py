"""The compiled DCNv4 core op (csrc/, the CPU kernel shared with DCNv3) against the pure-PyTorch reference, the
oracle: random configurations in every dtype, the official op cases, gradients, odd batch shapes, torch.compile and
the dispatcher's rules. (The Hub-layer side, `DCNv4Core` kernelized, is in test_hub_kernel_layer.py.)"""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from safetensors.torch import load_file

from internimage_hf.ops import dcnv4_core, dcnv4_core_reference, dcnv4_offset_mask_channels, loader
from internimage_hf.ops.compiled import DCNv3KernelWarning

from .conftest import rel_err

DTYPE_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def out_size(size, k, stride, pad, dil):
    return (size + 2 * pad - (dil * (k - 1) + 1)) // stride + 1


def make_case(
    n=2,
    h=7,
    w=6,
    group=2,
    gc=8,
    kh=3,
    kw=3,
    stride=1,
    pad=1,
    dil=1,
    scale=1.0,
    remove_center=0,
    extra=None,
    offset_mag=2.0,
    seed=0,
    dtype=torch.float64,
):
    """input (N, H, W, G*gc) and a packed offset_mask (N, Ho, Wo, G*3P + extra), padding channels random."""
    g = torch.Generator().manual_seed(seed)
    points = kh * kw - remove_center
    ho, wo = out_size(h, kh, stride, pad, dil), out_size(w, kw, stride, pad, dil)
    channels = dcnv4_offset_mask_channels(group, points) if extra is None else group * points * 3 + extra
    x = torch.randn(n, h, w, group * gc, generator=g, dtype=torch.float64)
    om = torch.randn(n, ho, wo, channels, generator=g, dtype=torch.float64)
    om[..., : group * points * 3].unflatten(-1, (group, 3 * points))[..., : 2 * points] *= offset_mag  # a view
    args = (kh, kw, stride, stride, pad, pad, dil, dil, group, gc, scale, remove_center)
    return x.to(dtype), om.to(dtype), args


def grads(fn, x, om, args, seed=1):
    x = x.detach().clone().requires_grad_()
    om = om.detach().clone().requires_grad_()
    out = fn(x, om, *args)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    out.backward(go)
    return out.detach(), (x.grad, om.grad)


def random_config(rng: random.Random) -> dict:
    """One configuration of the property test (always valid: the footprint fits the padded input)."""
    while True:
        kh, kw = rng.randint(1, 5), rng.randint(1, 5)
        remove_center = int(kh % 2 == 1 and kw % 2 == 1 and kh * kw > 1 and rng.random() < 0.3)
        stride, pad, dil = rng.randint(1, 2), rng.randint(0, 2), rng.randint(1, 2)
        h, w = rng.randint(3, 12), rng.randint(3, 12)
        if out_size(h, kh, stride, pad, dil) >= 1 and out_size(w, kw, stride, pad, dil) >= 1:
            break
    return dict(
        n=rng.randint(1, 3),
        h=h,
        w=w,
        group=rng.randint(1, 4),
        gc=rng.choice([1, 3, 8, 16, 32]),
        kh=kh,
        kw=kw,
        stride=stride,
        pad=pad,
        dil=dil,
        scale=rng.choice([0.5, 1.0, 1.25, 2.0, 0.3]),  # 0.3 is not exact in float32: the kernel rounds it too
        remove_center=remove_center,
        extra=rng.choice([0, 1, 5, None]),  # None: the official padding to a multiple of 8
        offset_mag=rng.choice([0.5, 2.0, 6.0]),
        seed=rng.randint(0, 2**31),
    )


CONFIGS = [random_config(random.Random(i)) for i in range(300)]


# ---------------------------------------------------------------------------------------------------------------
# The property test: compiled vs reference on 300 seeded configurations
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", range(6))
def test_random_configurations_float64_forward_and_backward(kernel, chunk):
    worst = [0.0, 0.0, 0.0]
    for cfg in CONFIGS[chunk::6]:
        x, om, args = make_case(**cfg)
        out_ref, g_ref = grads(dcnv4_core_reference, x, om, args)
        out, g = grads(kernel.dcnv4_core, x, om, args)
        errs = [rel_err(out, out_ref), rel_err(g[0], g_ref[0]), rel_err(g[1], g_ref[1])]
        assert max(errs) < 1e-12, (cfg, errs)
        points = cfg["kh"] * cfg["kw"] - cfg["remove_center"]
        assert not g[1][..., cfg["group"] * points * 3 :].any(), "gradient in offset_mask's padding channels"
        worst = [max(a, b) for a, b in zip(worst, errs)]
    print(f"worst float64 rel errors (output, grad input, grad offset_mask): {worst}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_configurations_low_precision(kernel, dtype):
    """float32 against the float32 reference (both round the same positions, in other orders); bfloat16 against the
    float64 reference (the kernel accumulates in float32 and rounds once)."""
    for cfg in CONFIGS[:: 2 if dtype == torch.float32 else 3]:
        x, om, args = make_case(**cfg, dtype=dtype)
        if dtype == torch.float32:
            out_ref, g_ref = grads(dcnv4_core_reference, x, om, args)
            out, g = grads(kernel.dcnv4_core, x, om, args)
            errs = [rel_err(out, out_ref), rel_err(g[0], g_ref[0]), rel_err(g[1], g_ref[1])]
            assert max(errs) < 1e-4 and errs[0] < 1e-5, (cfg, errs)
        else:
            out_ref = dcnv4_core_reference(x.double(), om.double(), *args)
            out = kernel.dcnv4_core(x, om, *args)
            assert out.dtype == torch.bfloat16
            assert rel_err(out, out_ref) < 2e-2, cfg


# ---------------------------------------------------------------------------------------------------------------
# The official op cases and gradients
# ---------------------------------------------------------------------------------------------------------------
def op_cases(flash_fixtures_dir):
    cases = load_file(flash_fixtures_dir / "dcnv4_op_cases.safetensors")
    for i in range(5):
        p = cases[f"case{i}.params"].tolist()
        args = tuple(p[:10]) + (cases[f"case{i}.offset_scale"].item(), p[10])
        yield i, cases[f"case{i}.input"], cases[f"case{i}.offset_mask"], args, cases[f"case{i}.output"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_official_op_cases_on_the_compiled_backend(use_kernel, flash_fixtures_dir, dtype):
    for i, x, om, args, expected in op_cases(flash_fixtures_dir):
        out = dcnv4_core(x.to(dtype), om.to(dtype), *args, backend="compiled")
        assert out.dtype == dtype and out.shape == expected.shape
        assert rel_err(out, expected) < DTYPE_TOL[dtype], (i, rel_err(out, expected))


def test_official_op_cases_gradients_match_reference(kernel, flash_fixtures_dir):
    for i, x, om, args, _ in op_cases(flash_fixtures_dir):
        _, g_ref = grads(dcnv4_core_reference, x, om, args)
        _, g = grads(kernel.dcnv4_core, x, om, args)
        assert rel_err(g[0], g_ref[0]) < 1e-12 and rel_err(g[1], g_ref[1]) < 1e-12, i


@pytest.mark.parametrize("backend", ["compiled", "reference"])
def test_gradcheck_float64(use_kernel, backend):
    for cfg in (
        dict(n=2, h=5, w=4, group=2, gc=3, extra=3, scale=1.25),
        dict(n=1, h=6, w=5, group=1, gc=2, kh=3, kw=2, pad=0, dil=2, stride=2, extra=0),
        dict(n=1, h=5, w=5, group=2, gc=2, remove_center=1, scale=0.5),
    ):
        x, om, args = make_case(**cfg)
        x.requires_grad_()
        om.requires_grad_()
        assert torch.autograd.gradcheck(lambda a, b, args=args: dcnv4_core(a, b, *args, backend=backend), (x, om)), cfg


# ---------------------------------------------------------------------------------------------------------------
# Shapes: batches whose pixel counts fit no block size, N = 0, layouts
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("h, w", [(12, 8), (7, 7), (14, 14)])  # Ho*Wo = 96, 49, 196
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batched_model_like_levels(kernel, h, w, dtype):
    x, om, args = make_case(n=2, h=h, w=w, group=4, gc=16, seed=h * w, dtype=dtype)
    out_ref, g_ref = grads(dcnv4_core_reference, x, om, args)
    out, g = grads(kernel.dcnv4_core, x, om, args)
    tol = DTYPE_TOL[dtype]
    assert rel_err(out, out_ref) < tol
    assert rel_err(g[0], g_ref[0]) < 10 * tol and rel_err(g[1], g_ref[1]) < 10 * tol
    # the images are independent: image 1 alone gives image 1's rows of the batch
    assert torch.equal(kernel.dcnv4_core(x[1:], om[1:], *args), out[1:])


def test_empty_batch(kernel):
    x, om, args = make_case(n=0, h=5, w=6, group=2, gc=4)
    out, (gx, gom) = grads(kernel.dcnv4_core, x, om, args)
    assert out.shape == (0, 5, 6, 8) and gx.shape == x.shape and gom.shape == om.shape


def test_non_contiguous_and_mixed_dtype_inputs(kernel):
    x, om, args = make_case(n=2, h=6, w=6, group=2, gc=8)
    wide = torch.cat([om, om], -1)[..., : om.shape[-1]]  # a view with a larger pixel stride
    x_t = x.transpose(1, 2).contiguous().transpose(1, 2)  # the same values, other strides
    ref = dcnv4_core_reference(x, om, *args)
    assert rel_err(kernel.dcnv4_core(x_t, wide, *args), ref) < 1e-12
    assert rel_err(kernel.dcnv4_core(x.float(), om, *args), ref) < 1e-5  # offset_mask cast to the input's dtype


def test_backward_is_deterministic(kernel):
    x, om, args = make_case(n=2, h=12, w=12, group=4, gc=16, dtype=torch.float32)
    _, first = grads(kernel.dcnv4_core, x, om, args)
    threads = torch.get_num_threads()
    try:
        for n_threads in {1, 2, threads}:
            torch.set_num_threads(n_threads)
            _, again = grads(kernel.dcnv4_core, x, om, args)
            assert all(torch.equal(a, b) for a, b in zip(first, again))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_every_cpu_isa_variant(kernel, dtype):
    x, om, args = make_case(n=2, h=9, w=8, group=3, gc=16, offset_mag=3.0, dtype=dtype)
    out_ref = dcnv4_core_reference(x.double(), om.double(), *args)
    best = kernel.cpu_isa()
    try:
        for level in range(best + 1):
            assert kernel.cpu_isa(level) == level
            assert rel_err(kernel.dcnv4_core(x, om, *args), out_ref) < DTYPE_TOL[dtype], level
    finally:
        kernel.cpu_isa(best)


def test_non_finite_offsets_and_weights_give_nan(kernel):
    x, om, args = make_case(n=1, h=5, w=5, group=2, gc=8)
    for channel in (0, 2 * 9):  # an offset, then a weight, of group 0's first point at pixel (0, 0)
        bad = om.clone()
        bad[0, 0, 0, channel] = float("nan")
        out = kernel.dcnv4_core(x, bad, *args)
        assert out[0, 0, 0, :8].isnan().all() and out[0, 0, 0, 8:].isfinite().all()
        assert out[0, 1:].isfinite().all()


def test_bad_arguments(use_kernel, kernel):
    x, om, args = make_case(n=1, h=5, w=5, group=2, gc=4)
    with pytest.raises(ValueError, match="offset_mask"):  # the dispatcher: the reference's checks, before C++
        dcnv4_core(x, om[..., :10], *args, backend="compiled")
    with pytest.raises(ValueError, match="remove_center"):
        dcnv4_core(x, om, 2, 2, *args[2:11], 1, backend="compiled")
    with pytest.raises(RuntimeError, match="DCNv4: offset_mask must have shape"):  # the C++ check itself
        kernel.functional.ops.dcnv4_forward(x, om[..., :10], *args)
    with pytest.raises(RuntimeError, match="DCNv4: offset_mask must have the input's dtype"):
        kernel.functional.ops.dcnv4_forward(x, om.float(), *args)


# ---------------------------------------------------------------------------------------------------------------
# torch.compile and the dispatcher
# ---------------------------------------------------------------------------------------------------------------
def test_torch_compile_fullgraph(use_kernel):
    x, om, args = make_case(n=2, h=8, w=8, group=4, gc=4, dtype=torch.float32)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    def f(a, b):
        return (dcnv4_core(a, b, *args, backend="compiled") * 2.0).sin()

    torch._dynamo.reset()
    try:
        compiled = torch.compile(f, backend=recording_backend, fullgraph=True)
        out_c, g_c = grads(lambda a, b, *_: compiled(a, b), x, om, args)
        out_e, g_e = grads(lambda a, b, *_: f(a, b), x, om, args)
    finally:
        torch._dynamo.reset()
    assert any("dcnv4_forward" in g for g in graphs), "the compiled op is not in the traced graph"
    assert torch.allclose(out_c, out_e, atol=1e-6)
    for a, b in zip(g_c, g_e):
        assert torch.allclose(a, b, atol=1e-5)


def test_dispatcher_backends(use_kernel, monkeypatch):
    x, om, args = make_case(dtype=torch.float32)
    ref = dcnv4_core_reference(x, om, *args)
    op = loader.get_compiled_op(required=True)
    calls = []
    kernel_dcnv4 = op.dcnv4
    monkeypatch.setattr(op, "dcnv4", lambda *a: calls.append(1) or kernel_dcnv4(*a))
    for backend in ("auto", "compiled", None):
        assert rel_err(dcnv4_core(x, om, *args, backend=backend), ref) < 1e-5
    assert len(calls) == 3
    assert torch.equal(dcnv4_core(x, om, *args, backend="reference"), ref) and len(calls) == 3
    # float16 on the CPU: not in the build, the reference without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dcnv4_core(x.half(), om.half(), *args).dtype == torch.float16
    assert len(calls) == 3


def test_exporting_uses_the_reference(use_kernel, monkeypatch):
    """torch.export / ONNX export see the reference's standard ops, never the custom op."""
    x, om, args = make_case(dtype=torch.float32)
    op = loader.get_compiled_op(required=True)
    monkeypatch.setattr(op, "dcnv4", lambda *a: pytest.fail("the compiled op ran while exporting"))
    monkeypatch.setattr("internimage_hf.ops.dispatch._exporting", lambda: True)
    assert torch.equal(dcnv4_core(x, om, *args), dcnv4_core_reference(x, om, *args))


def test_build_without_dcnv4_uses_the_reference(use_kernel, monkeypatch):
    """A kernel package built before DCNv4 (no "dcnv4" feature): auto -> the reference after one warning; compiled
    -> an error that says to rebuild. DCNv3 keeps its compiled path."""
    x, om, args = make_case(dtype=torch.float64)
    op = loader.get_compiled_op(required=True)
    monkeypatch.setattr(op, "has_dcnv4", False)
    monkeypatch.setattr(op, "dcnv4", None)
    monkeypatch.setattr("internimage_hf.ops.compiled._op_warned", set())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            assert torch.equal(dcnv4_core(x, om, *args), dcnv4_core_reference(x, om, *args))
    ours = [str(w.message) for w in record if issubclass(w.category, DCNv3KernelWarning)]
    assert len(ours) == 1 and "without the DCNv4 op" in ours[0] and "build-kernels" in ours[0], ours
    with pytest.raises(RuntimeError, match="built without the DCNv4 op"):
        dcnv4_core(x, om, *args, backend="compiled")


def test_hub_layer_contract(kernel):
    layer_cls = kernel.layers.DCNv4Core
    assert layer_cls.has_backward is True and layer_cls.can_torch_compile is True
    assert "dcnv4" in kernel.FEATURES
    x, om, args = make_case(n=1, h=5, w=5, group=2, gc=4)
    assert torch.equal(layer_cls()(x, om, *args), kernel.dcnv4_core(x, om, *args))
