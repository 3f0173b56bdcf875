"""The pure-PyTorch DCNv4 core against the official operator cases (float64 transliteration of the official CUDA
kernel), in every dtype, with gradients; and its relation to DCNv3 (the same sampling without the softmax)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from internimage_hf.ops import (
    dcnv3_core_reference,
    dcnv4_core,
    dcnv4_core_reference,
    dcnv4_offset_mask_channels,
)

from .conftest import rel_err


def op_cases(flash_fixtures_dir):
    cases = load_file(flash_fixtures_dir / "dcnv4_op_cases.safetensors")
    for i in range(5):
        p = cases[f"case{i}.params"].tolist()
        args = p[:10] + [cases[f"case{i}.offset_scale"].item(), p[10]]
        yield i, cases[f"case{i}.input"], cases[f"case{i}.offset_mask"], args, cases[f"case{i}.output"]


@pytest.mark.parametrize(
    "dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)]
)
def test_official_op_cases(flash_fixtures_dir, dtype, tol):
    for i, x, offset_mask, args, expected in op_cases(flash_fixtures_dir):
        out = dcnv4_core_reference(x.to(dtype), offset_mask.to(dtype), *args)
        assert out.dtype == dtype and out.shape == expected.shape
        assert rel_err(out, expected) < tol, f"case {i}: {rel_err(out, expected):.3g}"


def test_dispatcher_reference_backend(flash_fixtures_dir):
    for i, x, offset_mask, args, expected in op_cases(flash_fixtures_dir):
        assert rel_err(dcnv4_core(x, offset_mask, *args, backend="reference"), expected) < 1e-12, f"case {i}"


def test_gradcheck_float64(flash_fixtures_dir):
    for i, x, offset_mask, args, _ in op_cases(flash_fixtures_dir):
        # a corner of each case keeps gradcheck quick; the sampled positions stay fractional
        x = x[:1].clone().requires_grad_()
        offset_mask = offset_mask[:1].clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda a, b, args=args: dcnv4_core_reference(a, b, *args), (x, offset_mask)), i


def test_padding_channels_are_ignored(flash_fixtures_dir):
    """Channels past G*3P (the Linear's padding to a multiple of 8) have no effect, whatever they hold."""
    _, x, offset_mask, args, expected = next(iter(op_cases(flash_fixtures_dir)))
    group, points = args[8], args[0] * args[1] - args[11]
    assert offset_mask.shape[-1] == dcnv4_offset_mask_channels(group, points) > group * points * 3
    noisy = offset_mask.clone()
    noisy[..., group * points * 3 :] = torch.randn_like(noisy[..., group * points * 3 :]) * 100
    assert rel_err(dcnv4_core_reference(x, noisy, *args), expected) < 1e-12


@pytest.mark.parametrize("remove_center", [0, 1])
@pytest.mark.parametrize("stride, pad, dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2)])
def test_equals_dcnv3_without_softmax(stride, pad, dilation, remove_center):
    """DCNv4 = DCNv3 with the weights used as they are, read from one packed tensor (the official test's claim)."""
    g = torch.Generator().manual_seed(stride * 10 + pad * 3 + dilation + remove_center)
    n, h, w, group, gc, k = 2, 9, 7, 3, 4, 3
    points = k * k - remove_center
    x = torch.randn(n, h, w, group * gc, dtype=torch.float64, generator=g)
    h_out = (h + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    w_out = (w + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    offset = torch.randn(n, h_out, w_out, group * points * 2, dtype=torch.float64, generator=g) * 2
    mask = torch.randn(n, h_out, w_out, group * points, dtype=torch.float64, generator=g)
    packed = torch.cat([offset.unflatten(-1, (group, -1)), mask.unflatten(-1, (group, -1))], -1).flatten(-2)
    packed = torch.nn.functional.pad(packed, (0, dcnv4_offset_mask_channels(group, points) - packed.shape[-1]))
    args = (k, k, stride, stride, pad, pad, dilation, dilation, group, gc, 1.0, remove_center)
    v4 = dcnv4_core_reference(x, packed, *args)
    v3 = dcnv3_core_reference(x, offset, mask, *args)
    # DCNv3's reference keeps the official float32 normalised grid (about 1e-6 px): agreement to that level.
    assert rel_err(v4, v3) < 1e-5


def test_empty_batch_and_bad_shapes():
    x = torch.randn(0, 5, 5, 32, dtype=torch.float64, requires_grad=True)
    om = torch.randn(0, 5, 5, 56, dtype=torch.float64, requires_grad=True)
    out = dcnv4_core_reference(x, om, 3, 3, 1, 1, 1, 1, 1, 1, 2, 16, 1.0, 0)
    assert out.shape == (0, 5, 5, 32)
    out.sum().backward()
    assert x.grad.shape == x.shape and om.grad.shape == om.shape
    with pytest.raises(ValueError, match="offset_mask must have shape"):
        dcnv4_core_reference(torch.randn(1, 5, 5, 32), torch.randn(1, 5, 5, 50), 3, 3, 1, 1, 1, 1, 1, 1, 2, 16, 1.0, 0)
    with pytest.raises(ValueError, match="DCNv4 has no sampling points"):
        dcnv4_core_reference(torch.randn(1, 5, 5, 32), torch.randn(1, 5, 5, 8), 1, 1, 1, 1, 0, 0, 1, 1, 2, 16, 1.0, 1)
