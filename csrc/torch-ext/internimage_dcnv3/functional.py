"""The registered DCNv3 ops, their fake (meta) implementations and autograd formula, and Python entry points."""

from __future__ import annotations

import math

import torch

from ._ops import add_op_namespace_prefix, ops

__all__ = [
    "dcnv3_core",
    "dcnv3_forward",
    "dcnv3_backward",
    "dcnv4_core",
    "dcnv4_forward",
    "dcnv4_backward",
    "supports",
    "backends",
    "cpu_isa",
    "FEATURES",
]

# What this build's ops offer beyond the official DCNv3 arguments (callers check before using them):
# "mask_softmax": the mask may be passed as logits and is softmaxed over each (pixel, group)'s points in the op;
# "dcnv4": the DCNv4 core op (`dcnv4_core`, one packed offset_mask tensor, exact pixel coordinates).
FEATURES = frozenset({"mask_softmax", "dcnv4"})

_DTYPES = {
    "cpu": (torch.float64, torch.float32, torch.bfloat16),
    "cuda": (torch.float64, torch.float32, torch.float16, torch.bfloat16),
}


def backends() -> tuple[str, ...]:
    """Device types this build has kernels for ("cpu", and "cuda" for CUDA builds)."""
    return tuple(ops.backends().split(","))


_BACKENDS = backends()


def supports(input: torch.Tensor) -> bool:
    """Whether this build handles `input`'s device and dtype (others should use a reference implementation)."""
    device = input.device.type
    return device in _BACKENDS and input.dtype in _DTYPES.get(device, ())


def cpu_isa(request: int = -1) -> int:
    """Instruction-set level of the CPU kernels (0 portable, 1 AVX2, 2 AVX-512); request >= 0 caps it."""
    return int(ops.cpu_isa(int(request)))


def _output_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    """Output length of one spatial axis: floor((size + 2 pad - footprint) / stride) + 1 (Python floors; the C++
    twin is `output_size` in dcnv3_common/dcnv3_math.h, internimage_hf's `dcnv3_output_size` the same rule). An
    input smaller than the kernel footprint gives <= 0, refused by `_check_params`."""
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def _check_params(
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
    op="DCNv3",
) -> tuple[int, int]:
    """What the C++ kernels must never see, refused with one ValueError (as internimage_hf's reference does):
    non-positive sizes, a non-finite offset_scale, no sampling points, an empty output. Returns (H_out, W_out)."""
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
    if kernel_h * kernel_w - int(bool(remove_center)) < 1:
        raise ValueError(
            f"{op} has no sampling points: a {kernel_h}x{kernel_w} kernel with remove_center leaves "
            "none (use a kernel of at least 3x3, or remove_center=0)"
        )
    h_out = _output_size(h, kernel_h, stride_h, pad_h, dilation_h)
    w_out = _output_size(w, kernel_w, stride_w, pad_w, dilation_w)
    if h_out < 1 or w_out < 1:
        raise ValueError(
            f"{op} input {h}x{w} is smaller than the kernel footprint: kernel {kernel_h}x{kernel_w}, "
            f"stride {stride_h}x{stride_w}, padding {pad_h}x{pad_w}, dilation {dilation_h}x{dilation_w} "
            f"give an empty output ({max(h_out, 0)}x{max(w_out, 0)})"
        )
    return h_out, w_out


def _check_input(input, *params, op="DCNv3") -> tuple[int, int]:
    if input.dim() != 4:
        raise ValueError(f"{op} input must be channels-last (N, H, W, C); got a {input.dim()}-d tensor")
    return _check_params(input.shape[1], input.shape[2], *params, op=op)


def _check_input_v4(input, offset_mask, *params) -> tuple[int, int]:
    """DCNv4's parameters: DCNv3's rules (one ValueError), plus offset_mask on the input's device."""
    if offset_mask.device != input.device:
        raise ValueError(f"DCNv4 input and offset_mask must be on one device, got {input.device}, {offset_mask.device}")
    return _check_input(input, *params, op="DCNv4")


def _check_devices(input, offset, mask) -> None:
    if offset.device != input.device or mask.device != input.device:
        raise ValueError(
            f"DCNv3 input, offset and mask must be on one device, got {input.device}, {offset.device}, {mask.device}"
        )


# The autograd formula and fake implementations are registered once per process and op namespace. This package
# may be executed twice for one build (internimage_hf imports it under its own module name, `kernels` under the
# build's id): both copies are the same code on the same ops, and the second must neither override the first nor
# warn about doing so (torch.library overrides silently or with a warning, it does not refuse).
_DISPATCH_KEY = {"fake": "Meta", "autograd": "Autograd"}


def _registered(qualname: str, kind: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(qualname, _DISPATCH_KEY[kind]))
    except (AttributeError, RuntimeError, TypeError):  # private API gone or changed: register (at worst, an
        # identical formula replaces an identical one)
        return False


def _register(kind: str, name: str, fn, **kwargs) -> None:
    qualname = add_op_namespace_prefix(name)
    if _registered(qualname, kind):
        return
    if kind == "fake":
        torch.library.register_fake(qualname, fn, **kwargs)
    else:
        torch.library.register_autograd(qualname, fn, **kwargs)


def _forward_fake(
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
    offset_scale,
    remove_center,
    mask_softmax=False,
):
    h_out, w_out = _check_input(
        input,
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
    return input.new_empty((input.shape[0], h_out, w_out, input.shape[3]))


def _backward_fake(grad_output, input, offset, mask, *params):
    return torch.empty_like(input), torch.empty_like(offset), torch.empty_like(mask)


def _setup_context(ctx, inputs, output):
    input, offset, mask = inputs[:3]
    ctx.save_for_backward(input, offset, mask)
    ctx.params = tuple(inputs[3:])


def _backward(ctx, grad_output):
    input, offset, mask = ctx.saved_tensors
    grad_input, grad_offset, grad_mask = ops.dcnv3_backward(grad_output, input, offset, mask, *ctx.params)
    return (grad_input, grad_offset, grad_mask) + (None,) * len(ctx.params)


_register("fake", "dcnv3_forward", _forward_fake)
_register("fake", "dcnv3_backward", _backward_fake)
_register("autograd", "dcnv3_forward", _backward, setup_context=_setup_context)


def _v4_params(
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
) -> tuple:
    """DCNv4's parameters as the op schema types them, in its order."""
    return (
        int(kernel_h),
        int(kernel_w),
        int(stride_h),
        int(stride_w),
        int(pad_h),
        int(pad_w),
        int(dilation_h),
        int(dilation_w),
        int(group),
        int(group_channels),
        float(offset_scale),
        int(remove_center),
    )


def _v4_checked(input, offset_mask, params: tuple) -> tuple[int, int]:
    # _check_params takes DCNv3's order (remove_center after offset_scale, as here).
    return _check_input_v4(input, offset_mask, *params)


def _v4_forward_fake(input, offset_mask, *params):
    h_out, w_out = _v4_checked(input, offset_mask, params)
    return input.new_empty((input.shape[0], h_out, w_out, input.shape[3]))


def _v4_backward_fake(grad_output, input, offset_mask, *params):
    return torch.empty_like(input), torch.empty_like(offset_mask)


def _v4_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.params = tuple(inputs[2:])


def _v4_backward(ctx, grad_output):
    input, offset_mask = ctx.saved_tensors
    grad_input, grad_offset_mask = ops.dcnv4_backward(grad_output, input, offset_mask, *ctx.params)
    return (grad_input, grad_offset_mask) + (None,) * len(ctx.params)


_register("fake", "dcnv4_forward", _v4_forward_fake)
_register("fake", "dcnv4_backward", _v4_backward_fake)
_register("autograd", "dcnv4_forward", _v4_backward, setup_context=_v4_setup_context)


def dcnv3_forward(
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
    offset_scale,
    remove_center,
    mask_softmax=False,
) -> torch.Tensor:
    """The registered forward op (differentiable through its registered autograd formula)."""
    _check_input(
        input,
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
    _check_devices(input, offset, mask)
    return ops.dcnv3_forward(
        input,
        offset,
        mask,
        int(kernel_h),
        int(kernel_w),
        int(stride_h),
        int(stride_w),
        int(pad_h),
        int(pad_w),
        int(dilation_h),
        int(dilation_w),
        int(group),
        int(group_channels),
        float(offset_scale),
        int(remove_center),
        bool(mask_softmax),
    )


def dcnv3_backward(
    grad_output,
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
    offset_scale,
    remove_center,
    mask_softmax=False,
):
    """The registered backward op: (grad_input, grad_offset, grad_mask); grad_mask is for the logits if
    mask_softmax."""
    _check_input(
        input,
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
    _check_devices(input, offset, mask)
    return ops.dcnv3_backward(
        grad_output,
        input,
        offset,
        mask,
        int(kernel_h),
        int(kernel_w),
        int(stride_h),
        int(stride_w),
        int(pad_h),
        int(pad_w),
        int(dilation_h),
        int(dilation_w),
        int(group),
        int(group_channels),
        float(offset_scale),
        int(remove_center),
        bool(mask_softmax),
    )


def dcnv3_core(
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
    """DCNv3 core (official argument order). offset and mask are cast to input's dtype (as under autocast).

    mask_softmax: `mask` holds logits, softmaxed over each (pixel, group)'s points inside the op (one pass fewer
    over memory than softmax, then the op; gradients flow to the logits)."""
    if offset.dtype != input.dtype:
        offset = offset.to(input.dtype)
    if mask.dtype != input.dtype:
        mask = mask.to(input.dtype)
    return dcnv3_forward(
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
        offset_scale,
        remove_center,
        mask_softmax,
    )


def dcnv4_forward(
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
) -> torch.Tensor:
    """The registered DCNv4 forward op (differentiable through its registered autograd formula)."""
    params = _v4_params(
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
    _v4_checked(input, offset_mask, params)
    return ops.dcnv4_forward(input, offset_mask, *params)


def dcnv4_backward(
    grad_output,
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
):
    """The registered DCNv4 backward op: (grad_input, grad_offset_mask), zero in offset_mask's padding channels."""
    params = _v4_params(
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
    _v4_checked(input, offset_mask, params)
    return ops.dcnv4_backward(grad_output, input, offset_mask, *params)


def dcnv4_core(
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
    """DCNv4 core (the official argument order without its launch-tuning arguments), channels-last.

    offset_mask (N, Ho, Wo, >= G*3P): group g's 2P offsets ((x, y) pairs) then P weights from channel g*3P, the
    weights used as they are; channels past G*3P are ignored. Cast to input's dtype (as under autocast)."""
    if offset_mask.dtype != input.dtype:
        offset_mask = offset_mask.to(input.dtype)
    return dcnv4_forward(
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
