"""The pure-PyTorch DCNv3 core against the official operator cases, in every dtype, with gradients."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from internimage_hf.ops import dcnv3_core, dcnv3_core_reference

from .conftest import rel_err


def op_cases(fixtures_dir):
    cases = load_file(fixtures_dir / "dcnv3_op_cases.safetensors")
    for i in range(5):
        p = cases[f"case{i}.params"].tolist()
        args = p[:10] + [cases[f"case{i}.offset_scale"].item(), p[10]]
        yield (
            i,
            cases[f"case{i}.input"],
            cases[f"case{i}.offset"],
            cases[f"case{i}.mask"],
            args,
            cases[f"case{i}.output"],
        )


@pytest.mark.parametrize(
    "dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)]
)
def test_official_op_cases(fixtures_dir, dtype, tol):
    for i, x, offset, mask, args, expected in op_cases(fixtures_dir):
        out = dcnv3_core_reference(x.to(dtype), offset.to(dtype), mask.to(dtype), *args)
        assert out.dtype == dtype and out.shape == expected.shape
        assert rel_err(out, expected) < tol, f"case {i}"


@pytest.mark.parametrize("backend", ["reference", "compiled"])
def test_dispatcher_backends_match_official_float64(request, fixtures_dir, backend):
    """The official operator cases (float64) through the dispatcher, on both DCNv3 backends."""
    if backend == "compiled":
        request.getfixturevalue("use_kernel")
    for i, x, offset, mask, args, expected in op_cases(fixtures_dir):
        out = dcnv3_core(x, offset, mask, *args, backend=backend)
        assert out.dtype == torch.float64
        assert rel_err(out, expected) < 1e-12, f"case {i}: {rel_err(out, expected):.3g}"


def random_case(
    n=2,
    h=5,
    w=6,
    group=2,
    group_channels=3,
    k=3,
    stride=1,
    pad=1,
    dilation=1,
    remove_center=0,
    dtype=torch.float64,
    seed=0,
):
    g = torch.Generator().manual_seed(seed)
    points = k * k - remove_center
    h_out = (h + 2 * pad - (dilation * (k - 1) + 1)) // stride + 1
    w_out = (w + 2 * pad - (dilation * (k - 1) + 1)) // stride + 1
    x = torch.randn(n, h, w, group * group_channels, generator=g, dtype=dtype)
    offset = 2.5 * torch.randn(n, h_out, w_out, group * points * 2, generator=g, dtype=dtype)
    mask = torch.randn(n, h_out, w_out, group, points, generator=g, dtype=dtype).softmax(-1).flatten(-2)
    args = [k, k, stride, stride, pad, pad, dilation, dilation, group, group_channels, 1.5, remove_center]
    return x, offset, mask, args


@pytest.mark.parametrize(
    "params",
    [
        dict(),
        dict(stride=2, pad=1),
        dict(k=5, pad=2, dilation=1, remove_center=1),
        dict(k=3, pad=2, dilation=2),
        dict(k=1, pad=0, group=3, group_channels=2),
    ],
)
def test_gradcheck_float64(params):
    x, offset, mask, args = random_case(n=1, h=4, w=5, **params)
    # Keep samples away from integer pixel positions, where bilinear weights have kinks.
    offset = offset + 0.37
    inputs = tuple(t.clone().requires_grad_(True) for t in (x, offset, mask))
    assert torch.autograd.gradcheck(
        lambda a, b, c: dcnv3_core_reference(a, b, c, *args), inputs, eps=1e-6, atol=1e-5, rtol=1e-4
    )


def exact_pixel_reference(x, offset, mask, k, _, stride, __, pad, ___, dil, ____, group, gc, scale, rc):
    """Independent float64 loop over the DCNv3 formula (exact pixel arithmetic, no grid_sample)."""
    n, h, w, _c = x.shape
    h_out, w_out = offset.shape[1:3]
    points = k * k - rc
    out = torch.zeros(n, h_out, w_out, group * gc, dtype=torch.float64)
    xs = x.double()
    center = (k // 2) * k + k // 2
    for b in range(n):
        for ho in range(h_out):
            for wo in range(w_out):
                for g in range(group):
                    p = 0
                    for i in range(k):  # x-major: i over width outer, j over height inner
                        for j in range(k):
                            if rc and i * k + j == center:
                                continue
                            dx = offset[b, ho, wo, g * points * 2 + p * 2].item()
                            dy = offset[b, ho, wo, g * points * 2 + p * 2 + 1].item()
                            lx = (
                                wo * stride - pad + (dil * (k - 1)) // 2 + (i * dil - (dil * (k - 1)) // 2 + dx) * scale
                            )
                            ly = (
                                ho * stride - pad + (dil * (k - 1)) // 2 + (j * dil - (dil * (k - 1)) // 2 + dy) * scale
                            )
                            x0, y0 = int(torch.floor(torch.tensor(lx))), int(torch.floor(torch.tensor(ly)))
                            fx, fy = lx - x0, ly - y0
                            val = torch.zeros(gc, dtype=torch.float64)
                            for yy, xx, wgt in (
                                (y0, x0, (1 - fy) * (1 - fx)),
                                (y0, x0 + 1, (1 - fy) * fx),
                                (y0 + 1, x0, fy * (1 - fx)),
                                (y0 + 1, x0 + 1, fy * fx),
                            ):
                                if 0 <= yy < h and 0 <= xx < w:
                                    val += wgt * xs[b, yy, xx, g * gc : (g + 1) * gc]
                            out[b, ho, wo, g * gc : (g + 1) * gc] += mask[b, ho, wo, g * points + p].item() * val
                            p += 1
    return out


@pytest.mark.parametrize(
    "params",
    [dict(), dict(stride=2), dict(k=5, pad=2, remove_center=1), dict(dilation=2, pad=2, group=1, group_channels=4)],
)
def test_matches_independent_loop(params):
    """The DCNv3 formula written as plain loops: agreement to the float32 rounding of the fixed grid (< 1e-6 px)."""
    x, offset, mask, args = random_case(**params)
    out = dcnv3_core_reference(x, offset, mask, *args)
    assert rel_err(out, exact_pixel_reference(x, offset, mask, *args)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_and_is_close(dtype):
    x, offset, mask, args = random_case(n=2, h=9, w=7, group=4, group_channels=8)
    ref = dcnv3_core_reference(x, offset, mask, *args)
    out = dcnv3_core_reference(x.to(dtype), offset.to(dtype), mask.to(dtype), *args)
    assert out.dtype == dtype
    assert rel_err(out, ref) < 2e-2


def test_no_nans_for_huge_offsets():
    x, offset, mask, args = random_case(dtype=torch.float32)
    out = dcnv3_core_reference(x, offset * 1e6, mask, *args)
    assert torch.isfinite(out).all()
    # samples far outside the image read zeros
    assert out.abs().max() == 0


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(x=torch.randn(2, 5, 6)), "channels-last"),
        (dict(group=5), "group \\* group_channels"),
        (dict(offset=torch.randn(2, 5, 6, 7)), "offset must have shape"),
        (dict(mask=torch.randn(2, 5, 6, 3)), "mask must have shape"),
    ],
)
def test_bad_arguments_raise_clear_errors(bad, message):
    x, offset, mask, args = random_case()
    x, offset, mask = bad.get("x", x), bad.get("offset", offset), bad.get("mask", mask)
    if "group" in bad:
        args = list(args)
        args[8] = bad["group"]
    with pytest.raises(ValueError, match=message):
        dcnv3_core_reference(x, offset, mask, *args)


def test_unknown_backend_is_rejected():
    x, offset, mask, args = random_case()
    with pytest.raises(ValueError, match="Unknown DCNv3 backend"):
        dcnv3_core(x, offset, mask, *args, backend="cuda-magic")
