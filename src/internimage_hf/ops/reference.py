"""Pure-PyTorch DCNv3 core: the oracle every compiled kernel is tested against.

It follows the official CUDA kernel's math (written out in `dcnv3_core_reference` below and in
csrc/dcnv3_common/dcnv3_math.h) rather than the official PyTorch fallback's code: sampling
locations are computed in absolute pixel coordinates of the unpadded input (no P-fold padded copy, no float32
reference grid leaking into other dtypes), and corners outside the image read as zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def dcnv3_output_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    """Output length of one spatial axis, as in a convolution: floor((size + 2 pad - footprint) / stride) + 1.

    The one Python definition of the rule (the reference, the dispatcher and the checks use it; the C++ twin is
    `output_size` in csrc/dcnv3_common/dcnv3_math.h, the kernel package's fake implementation carries a copy).
    Python's `//` floors, so an input smaller than the kernel footprint gives a length <= 0 (an empty output,
    refused by `check_dcnv3_params`), never 1.
    """
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def dcnv3_num_points(kernel_h: int, kernel_w: int, remove_center: int) -> int:
    """Sampling points per group: kernel_h * kernel_w, less the centre with remove_center."""
    return kernel_h * kernel_w - int(bool(remove_center))


def check_dcnv3_params(
    h: int,
    w: int,
    kernel_h: int,
    kernel_w: int,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    group: int,
    group_channels: int,
    offset_scale: float,
    remove_center: int,
) -> tuple[int, int, int]:
    """The checks every backend shares, before any kernel runs: return (H_out, W_out, P) or raise ValueError.

    Integer parameters >= 1 (padding >= 0), a finite offset_scale, at least one sampling point per group (a 1x1
    kernel with remove_center has none), an odd kernel for remove_center, and a non-empty output (an input smaller
    than the kernel footprint).
    """
    for name, value in (
        ("kernel_h", kernel_h),
        ("kernel_w", kernel_w),
        ("stride_h", stride_h),
        ("stride_w", stride_w),
        ("dilation_h", dilation_h),
        ("dilation_w", dilation_w),
        ("group", group),
        ("group_channels", group_channels),
    ):
        if value < 1:
            raise ValueError(f"DCNv3 {name} must be >= 1, got {value}")
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"DCNv3 padding must be >= 0, got pad_h={pad_h}, pad_w={pad_w}")
    if not math.isfinite(offset_scale):
        raise ValueError(f"DCNv3 offset_scale must be finite, got {offset_scale}")
    if remove_center and (kernel_h % 2 == 0 or kernel_w % 2 == 0):
        raise ValueError("DCNv3 remove_center needs an odd kernel size")
    points = dcnv3_num_points(kernel_h, kernel_w, remove_center)
    if points < 1:
        raise ValueError(
            f"DCNv3 has no sampling points: a {kernel_h}x{kernel_w} kernel with remove_center leaves "
            "none (use a kernel of at least 3x3, or remove_center=0)"
        )
    h_out = dcnv3_output_size(h, kernel_h, stride_h, pad_h, dilation_h)
    w_out = dcnv3_output_size(w, kernel_w, stride_w, pad_w, dilation_w)
    if h_out < 1 or w_out < 1:
        raise ValueError(
            f"DCNv3 input {h}x{w} is smaller than the kernel footprint: kernel {kernel_h}x{kernel_w}, "
            f"stride {stride_h}x{stride_w}, padding {pad_h}x{pad_w}, dilation {dilation_h}x{dilation_w} "
            f"give an empty output ({max(h_out, 0)}x{max(w_out, 0)})"
        )
    return h_out, w_out, points


def check_dcnv3_args(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    kernel_h: int,
    kernel_w: int,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    group: int,
    group_channels: int,
    remove_center: int,
    offset_scale: float = 1.0,
) -> tuple[int, int, int]:
    """Validate shapes and parameters; return (H_out, W_out, P). Raises ValueError with a readable message."""
    for name, t in (("input", input), ("offset", offset), ("mask", mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"DCNv3 {name} must be a tensor, got {type(t).__name__}")
        if t.is_complex():
            raise TypeError(f"DCNv3 {name} must be real, got {t.dtype}")
    if not input.is_floating_point():  # (offset and mask are cast to the compute dtype, as the compiled op does)
        raise TypeError(f"DCNv3 input must be a floating-point tensor, got {input.dtype}")
    if input.dim() != 4:
        raise ValueError(f"DCNv3 input must be channels-last (N, H, W, C); got a {input.dim()}-d tensor")
    if offset.device != input.device or mask.device != input.device:
        raise ValueError(
            f"DCNv3 input, offset and mask must be on one device, got {input.device}, {offset.device}, {mask.device}"
        )
    n, h, w, c = input.shape
    h_out, w_out, points = check_dcnv3_params(
        h,
        w,
        kernel_h,
        kernel_w,
        stride_h,
        stride_w,
        pad_h,
        pad_w,
        dilation_h,
        dilation_w,
        group,
        group_channels,
        offset_scale,
        remove_center,
    )
    if c != group * group_channels:
        raise ValueError(
            f"DCNv3 input has {c} channels but group * group_channels = {group} * {group_channels} = "
            f"{group * group_channels}"
        )
    expected_offset = (n, h_out, w_out, group * points * 2)
    expected_mask = (n, h_out, w_out, group * points)
    if tuple(offset.shape) != expected_offset:
        raise ValueError(f"DCNv3 offset must have shape {expected_offset}, got {tuple(offset.shape)}")
    if tuple(mask.shape) != expected_mask:
        raise ValueError(f"DCNv3 mask must have shape {expected_mask}, got {tuple(mask.shape)}")
    return h_out, w_out, points


def point_softmax(logits: torch.Tensor, group: int) -> torch.Tensor:
    """Softmax of DCNv3 mask logits (..., G*P) over each group's P points, computed in float32 for half types.

    torch.softmax reduces a 9-wide last dimension poorly on CPU; without autograd, these elementwise passes are
    3-5x faster. With autograd, torch.softmax saves the least for backward.
    """
    dtype = logits.dtype
    grouped = logits.unflatten(-1, (group, -1))
    if torch.is_grad_enabled() and logits.requires_grad:
        compute = torch.float32 if dtype in _LOW_PRECISION else dtype
        return grouped.softmax(-1, dtype=compute).to(dtype).flatten(-2)
    if dtype in _LOW_PRECISION:
        grouped = grouped.float()
    weights = (grouped - grouped.amax(dim=-1, keepdim=True)).exp_()
    weights.div_(weights.sum(dim=-1, keepdim=True))
    return weights.to(dtype).flatten(-2)


def sampling_base(
    h: int,
    w: int,
    h_out: int,
    w_out: int,
    kernel_h: int,
    kernel_w: int,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    offset_scale: float,
    remove_center: int,
    device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed part of every sampling location, in the official reference's normalised float32 coordinates.

    The official PyTorch reference (which produced the parity fixtures) forms ``reference point + kernel grid *
    offset_scale`` in float32 coordinates normalised by the padded size, whatever the input dtype, and adds the
    learned offset afterwards. We form that fixed part the same way (and only that part: the offsets and the
    sampling itself stay in the compute dtype), so float64 results agree with the official ones to float64 rounding.
    The difference to exact pixel arithmetic is below 1e-6 pixel. Returns base_x (W_out, P) and base_y (H_out, P),
    with the point order x-major: p = i * kernel_h + j, i over width, j over height.
    """
    f32 = torch.float32
    h_pad, w_pad = h + 2 * pad_h, w + 2 * pad_w
    half_w, half_h = (dilation_w * (kernel_w - 1)) // 2 + 0.5, (dilation_h * (kernel_h - 1)) // 2 + 0.5
    ref_x = (torch.arange(w_out, device=device, dtype=f32) * stride_w + half_w) / w_pad
    ref_y = (torch.arange(h_out, device=device, dtype=f32) * stride_h + half_h) / h_pad
    gx = torch.arange(kernel_w, device=device, dtype=f32) * dilation_w - (dilation_w * (kernel_w - 1)) // 2
    gy = torch.arange(kernel_h, device=device, dtype=f32) * dilation_h - (dilation_h * (kernel_h - 1)) // 2
    gx = (gx / w_pad).repeat_interleave(kernel_h)  # point p = i * kernel_h + j has dx = gx[i]
    gy = (gy / h_pad).repeat(kernel_w)  # ... and dy = gy[j]
    if remove_center:
        keep = torch.ones(kernel_h * kernel_w, dtype=torch.bool, device=device)
        keep[(kernel_w // 2) * kernel_h + kernel_h // 2] = False
        gx, gy = gx[keep], gy[keep]
    base_x = ref_x[:, None] + gx[None, :] * offset_scale
    base_y = ref_y[:, None] + gy[None, :] * offset_scale
    return base_x, base_y


def dcnv3_core_reference(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    kernel_h: int,
    kernel_w: int,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    group: int,
    group_channels: int,
    offset_scale: float,
    remove_center: int,
    mask_softmax: bool = False,
) -> torch.Tensor:
    """DCNv3 core in plain PyTorch (differentiable in input, offset and mask).

    input (N, H, W, G*Cg), offset (N, Ho, Wo, G*P*2) as (dx, dy) pairs, mask (N, Ho, Wo, G*P) already normalised,
    or logits to softmax over each group's P points first if mask_softmax. For output pixel (y, x), group g and
    channel c:

        out[n, y, x, g*Cg + c] = sum_p mask[n, y, x, g*P + p] * bilinear(input[n, :, :, g*Cg + c], loc_p)
        loc_p = (x*stride_w + e_w - pad_w, y*stride_h + e_h - pad_h) + grid_p * offset_scale + offset_p

    with e = dilation*(kernel-1)//2, grid_p the dilated kernel offsets around the centre (x-major point order; the
    centre point dropped when remove_center), and bilinear reading zero outside the image (`sampling_base`).
    float16/bfloat16 are computed in float32 and cast back, as a GPU kernel accumulates; float64 stays float64.
    """
    h_out, w_out, points = check_dcnv3_args(
        input,
        offset,
        mask,
        kernel_h,
        kernel_w,
        stride_h,
        stride_w,
        pad_h,
        pad_w,
        dilation_h,
        dilation_w,
        group,
        group_channels,
        remove_center,
        offset_scale,
    )
    out_dtype = input.dtype
    n, h, w, c = input.shape
    if n == 0:
        # An empty batch: an empty output, still attached to the graph (its gradients are empty zeros).
        link = input.sum().to(out_dtype) + offset.sum().to(out_dtype) + mask.sum().to(out_dtype)
        return input.new_zeros((0, h_out, w_out, c)) * link
    if mask_softmax:
        mask = point_softmax(mask, group)
    compute_dtype = torch.float32 if out_dtype in _LOW_PRECISION else out_dtype
    base_x, base_y = sampling_base(
        h,
        w,
        h_out,
        w_out,
        kernel_h,
        kernel_w,
        stride_h,
        stride_w,
        pad_h,
        pad_w,
        dilation_h,
        dilation_w,
        offset_scale,
        remove_center,
        input.device,
    )
    h_pad, w_pad = h + 2 * pad_h, w + 2 * pad_w
    offset = offset.to(compute_dtype).reshape(n, h_out, w_out, group, points, 2)  # any strides
    # Normalised location in the padded image, then grid_sample's [-1, 1] convention (align_corners=False).
    loc_x = base_x.to(compute_dtype).view(1, 1, w_out, 1, points) + offset[..., 0] * offset_scale / w_pad
    loc_y = base_y.to(compute_dtype).view(1, h_out, 1, 1, points) + offset[..., 1] * offset_scale / h_pad
    grid = torch.stack((2 * loc_x - 1, 2 * loc_y - 1), dim=-1)
    grid = grid.permute(0, 3, 1, 2, 4, 5).reshape(n * group, h_out * w_out, points, 2)

    x = F.pad(input.to(compute_dtype), (0, 0, pad_w, pad_w, pad_h, pad_h))
    value = x.reshape(n, h_pad, w_pad, group, group_channels).permute(0, 3, 4, 1, 2)
    value = value.reshape(n * group, group_channels, h_pad, w_pad)
    sampled = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # sampled: (N*G, Cg, Ho*Wo, P); weight every point by its mask and sum over points.
    weights = mask.to(compute_dtype).reshape(n, h_out * w_out, group, points).permute(0, 2, 1, 3)
    # Multiply-then-sum, as the official reference does: its float32 rounding is what the fixtures hold.
    out = (sampled * weights.reshape(n * group, 1, h_out * w_out, points)).sum(-1)
    out = out.reshape(n, group, group_channels, h_out, w_out).permute(0, 3, 4, 1, 2).reshape(n, h_out, w_out, -1)
    return out.to(out_dtype)
