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
    op: str = "DCNv3",
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
            raise ValueError(f"{op} {name} must be >= 1, got {value}")
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"{op} padding must be >= 0, got pad_h={pad_h}, pad_w={pad_w}")
    # Not while compiling: torch.compile(dynamic=True) traces offset_scale as a symbolic float, which math.isfinite
    # cannot take (fullgraph fails); a compiled model's value comes from its config, which refuses non-finite ones.
    if not torch.compiler.is_compiling() and not math.isfinite(offset_scale):
        raise ValueError(f"{op} offset_scale must be finite, got {offset_scale}")
    if remove_center and (kernel_h % 2 == 0 or kernel_w % 2 == 0):
        raise ValueError(f"{op} remove_center needs an odd kernel size")
    points = dcnv3_num_points(kernel_h, kernel_w, remove_center)
    if points < 1:
        raise ValueError(
            f"{op} has no sampling points: a {kernel_h}x{kernel_w} kernel with remove_center leaves "
            "none (use a kernel of at least 3x3, or remove_center=0)"
        )
    h_out = dcnv3_output_size(h, kernel_h, stride_h, pad_h, dilation_h)
    w_out = dcnv3_output_size(w, kernel_w, stride_w, pad_w, dilation_w)
    if h_out < 1 or w_out < 1:
        raise ValueError(
            f"{op} input {h}x{w} is smaller than the kernel footprint: kernel {kernel_h}x{kernel_w}, "
            f"stride {stride_h}x{stride_w}, padding {pad_h}x{pad_w}, dilation {dilation_h}x{dilation_w} "
            f"give an empty output ({max(h_out, 0)}x{max(w_out, 0)})"
        )
    return h_out, w_out, points


def _check_input_and_params(
    op: str, tensors: dict[str, torch.Tensor], geometry: tuple, offset_scale: float, remove_center: int
) -> tuple[int, int, int, int]:
    """The checks DCNv3 and DCNv4 share: real tensors (`tensors` starts with "input"), a floating-point 4-d
    channels-last input, one device, valid parameters (`check_dcnv3_params`; geometry = kernel_h ... group_channels)
    and group * group_channels input channels. Returns (N, H_out, W_out, P)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op} {name} must be a tensor, got {type(t).__name__}")
        if t.is_complex():
            raise TypeError(f"{op} {name} must be real, got {t.dtype}")
    input = tensors["input"]
    if not input.is_floating_point():  # (the other tensors are cast to the compute dtype, as the compiled op does)
        raise TypeError(f"{op} input must be a floating-point tensor, got {input.dtype}")
    if input.dim() != 4:
        raise ValueError(f"{op} input must be channels-last (N, H, W, C); got a {input.dim()}-d tensor")
    if any(t.device != input.device for t in tensors.values()):
        *first, last = tensors
        devices = ", ".join(str(t.device) for t in tensors.values())
        raise ValueError(f"{op} {', '.join(first)} and {last} must be on one device, got {devices}")
    n, h, w, c = input.shape
    group, group_channels = geometry[8], geometry[9]
    h_out, w_out, points = check_dcnv3_params(h, w, *geometry, offset_scale, remove_center, op=op)
    if c != group * group_channels:
        raise ValueError(
            f"{op} input has {c} channels but group * group_channels = {group} * {group_channels} = "
            f"{group * group_channels}"
        )
    return n, h_out, w_out, points


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
    n, h_out, w_out, points = _check_input_and_params(
        "DCNv3",
        {"input": input, "offset": offset, "mask": mask},
        (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, group_channels),
        offset_scale,
        remove_center,
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
    x = F.pad(input.to(compute_dtype), (0, 0, pad_w, pad_w, pad_h, pad_h))
    weights = mask.to(compute_dtype).reshape(n, h_out, w_out, group, points)
    return _sample_points(x, grid, weights, group_channels).to(out_dtype)


def _sample_points(value: torch.Tensor, grid: torch.Tensor, weights: torch.Tensor, group_channels: int) -> torch.Tensor:
    """The sampling both DCN versions share: out[n, y, x, g, c] = sum_p weights[n, y, x, g, p] * bilinear(value[n,
    :, :, g, c], grid[n, y, x, g, p]), bilinear reading zero outside the image.

    value (N, H, W, G*Cg) channels-last; grid (N, Ho, Wo, G, P, 2) in grid_sample's (x, y) convention for `value`'s
    size (align_corners=False); weights (N, Ho, Wo, G, P). Returns (N, Ho, Wo, G*Cg) in the compute dtype.
    """
    n, h, w, _ = value.shape
    _, h_out, w_out, group, points, _ = grid.shape
    value = value.reshape(n, h, w, group, group_channels).permute(0, 3, 4, 1, 2)
    value = value.reshape(n * group, group_channels, h, w)
    grid = grid.permute(0, 3, 1, 2, 4, 5).reshape(n * group, h_out * w_out, points, 2)
    sampled = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # sampled: (N*G, Cg, Ho*Wo, P); weight every point and sum over points.
    weights = weights.reshape(n, h_out * w_out, group, points).permute(0, 2, 1, 3)
    # Multiply-then-sum, as the official reference does: its float32 rounding is what the fixtures hold.
    out = (sampled * weights.reshape(n * group, 1, h_out * w_out, points)).sum(-1)
    return out.reshape(n, group, group_channels, h_out, w_out).permute(0, 3, 4, 1, 2).reshape(n, h_out, w_out, -1)


def dcnv4_offset_mask_channels(group: int, points: int) -> int:
    """Channels of the `offset_mask` tensor DCNv4 layers produce: G * 3P rounded up to a multiple of 8 (the
    official `offset_mask` Linear's width; the op reads the first G * 3P and ignores the rest)."""
    return (group * points * 3 + 7) // 8 * 8


def check_dcnv4_args(
    input: torch.Tensor,
    offset_mask: torch.Tensor,
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
    """Validate DCNv4 shapes and parameters; return (H_out, W_out, P). Raises ValueError/TypeError."""
    n, h_out, w_out, points = _check_input_and_params(
        "DCNv4",
        {"input": input, "offset_mask": offset_mask},
        (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, group_channels),
        offset_scale,
        remove_center,
    )
    needed = group * points * 3
    if offset_mask.dim() != 4 or tuple(offset_mask.shape[:3]) != (n, h_out, w_out) or offset_mask.shape[3] < needed:
        raise ValueError(
            f"DCNv4 offset_mask must have shape ({n}, {h_out}, {w_out}, >= {needed}) (G * 3P channels, usually "
            f"padded to {dcnv4_offset_mask_channels(group, points)}), got {tuple(offset_mask.shape)}"
        )
    return h_out, w_out, points


def dcnv4_core_reference(
    input: torch.Tensor,
    offset_mask: torch.Tensor,
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
) -> torch.Tensor:
    """DCNv4 core in plain PyTorch (differentiable in input and offset_mask): DCNv3 without the softmax, offsets and
    weights read from one tensor.

    input (N, H, W, G*Cg); offset_mask (N, Ho, Wo, >= G*3P): group g holds, from channel g*3P, 2P offsets (x, y
    interleaved) then P weights, used as they are (any sign, not normalised); channels past G*3P are ignored. With
    e = (dilation*(kernel-1)) >> 1, s = offset_scale rounded to float32 (the official kernel takes a C++ float), and
    point p = i*kernel_h + j (i over width, j over height, the centre skipped with remove_center):

        y = (y_out*stride_h + e_h - pad_h - e_h*s) + (j*dilation_h + dy_p)*s      (x likewise with i, w, dx_p)
        out[n, y_out, x_out, g*Cg + c] = sum_p m_p * bilinear(input[n, :, :, g*Cg + c], y, x)

    in exact pixel coordinates (the official DCNv4 kernel's arithmetic, not DCNv3's normalised float32 grid), bilinear
    reading zero outside the image. float16/bfloat16 are computed in float32 and cast back.
    """
    h_out, w_out, points = check_dcnv4_args(
        input,
        offset_mask,
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
    out_dtype = input.dtype
    n, h, w, c = input.shape
    if n == 0:
        link = input.sum().to(out_dtype) + offset_mask.sum().to(out_dtype)
        return input.new_zeros((0, h_out, w_out, c)) * link
    compute_dtype = torch.float32 if out_dtype in _LOW_PRECISION else out_dtype
    scale = float(torch.tensor(offset_scale, dtype=torch.float32))
    dev = input.device
    tap_x, tap_y = _point_taps(kernel_h, kernel_w, remove_center, dilation_h, dilation_w, dev, compute_dtype)
    e_h, e_w = (dilation_h * (kernel_h - 1)) >> 1, (dilation_w * (kernel_w - 1)) >> 1
    start_y = torch.arange(h_out, device=dev, dtype=compute_dtype) * stride_h + (e_h - pad_h) - e_h * scale
    start_x = torch.arange(w_out, device=dev, dtype=compute_dtype) * stride_w + (e_w - pad_w) - e_w * scale
    om = offset_mask[..., : group * points * 3].to(compute_dtype).unflatten(-1, (group, 3 * points))
    offset = om[..., : 2 * points].unflatten(-1, (points, 2))
    y = start_y.view(1, h_out, 1, 1, 1) + (tap_y + offset[..., 1]) * scale
    x = start_x.view(1, 1, w_out, 1, 1) + (tap_x + offset[..., 0]) * scale
    # Pixel coordinates to grid_sample's [-1, 1] (align_corners=False: pixel centres at (2k + 1) / size - 1).
    grid = torch.stack(((2 * x + 1) / w - 1, (2 * y + 1) / h - 1), dim=-1)
    return _sample_points(input.to(compute_dtype), grid, om[..., 2 * points :], group_channels).to(out_dtype)


def _point_taps(kernel_h, kernel_w, remove_center, dilation_h, dilation_w, device, dtype):
    """Kernel tap of every point, (tap_x, tap_y) each (P,): point p = i * kernel_h + j sits at (i * dilation_w,
    j * dilation_h), the centre dropped with remove_center."""
    i = torch.arange(kernel_w, device=device).repeat_interleave(kernel_h)
    j = torch.arange(kernel_h, device=device).repeat(kernel_w)
    if remove_center:
        keep = (i != kernel_w // 2) | (j != kernel_h // 2)
        i, j = i[keep], j[keep]
    return (i * dilation_w).to(dtype), (j * dilation_h).to(dtype)
