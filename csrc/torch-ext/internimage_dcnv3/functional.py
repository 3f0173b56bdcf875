"""The registered DCNv3 ops, their fake (meta) implementations and autograd formula, and Python entry points."""

from __future__ import annotations

import torch

from ._ops import add_op_namespace_prefix, ops

__all__ = ["dcnv3_core", "dcnv3_forward", "dcnv3_backward", "supports", "backends", "cpu_isa", "FEATURES"]

# What this build's ops accept beyond the official arguments (callers check before using them):
# "mask_softmax": the mask may be passed as logits and is softmaxed over each (pixel, group)'s points in the op.
FEATURES = frozenset({"mask_softmax"})

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
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def _register(kind: str, name: str, fn, **kwargs) -> None:
    """Register a fake impl / autograd formula once, even if this package is imported twice (it happens when one
    build is loaded both directly and through `kernels`: the shared library, hence the op namespace, is the same)."""
    qualname = add_op_namespace_prefix(name)
    try:
        if kind == "fake":
            torch.library.register_fake(qualname, fn, **kwargs)
        else:
            torch.library.register_autograd(qualname, fn, **kwargs)
    except RuntimeError as err:  # already registered by an earlier import of the same build
        if "already" not in str(err).lower():
            raise


def _forward_fake(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                  dilation_w, group, group_channels, offset_scale, remove_center, mask_softmax=False):
    n, h, w, c = input.shape
    h_out = _output_size(h, kernel_h, stride_h, pad_h, dilation_h)
    w_out = _output_size(w, kernel_w, stride_w, pad_w, dilation_w)
    return input.new_empty((n, h_out, w_out, c))


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


def dcnv3_forward(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                  dilation_w, group, group_channels, offset_scale, remove_center, mask_softmax=False) -> torch.Tensor:
    """The registered forward op (differentiable through its registered autograd formula)."""
    return ops.dcnv3_forward(input, offset, mask, int(kernel_h), int(kernel_w), int(stride_h), int(stride_w),
                             int(pad_h), int(pad_w), int(dilation_h), int(dilation_w), int(group),
                             int(group_channels), float(offset_scale), int(remove_center), bool(mask_softmax))


def dcnv3_backward(grad_output, input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                   dilation_h, dilation_w, group, group_channels, offset_scale, remove_center, mask_softmax=False):
    """The registered backward op: (grad_input, grad_offset, grad_mask); grad_mask is for the logits if
    mask_softmax."""
    return ops.dcnv3_backward(grad_output, input, offset, mask, int(kernel_h), int(kernel_w), int(stride_h),
                              int(stride_w), int(pad_h), int(pad_w), int(dilation_h), int(dilation_w), int(group),
                              int(group_channels), float(offset_scale), int(remove_center), bool(mask_softmax))


def dcnv3_core(input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, kernel_h: int, kernel_w: int,
               stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int,
               group_channels: int, offset_scale: float, remove_center: int,
               mask_softmax: bool = False) -> torch.Tensor:
    """DCNv3 core (official argument order). offset and mask are cast to input's dtype (as under autocast).

    mask_softmax: `mask` holds logits, softmaxed over each (pixel, group)'s points inside the op (one pass fewer
    over memory than softmax, then the op; gradients flow to the logits)."""
    if offset.dtype != input.dtype:
        offset = offset.to(input.dtype)
    if mask.dtype != input.dtype:
        mask = mask.to(input.dtype)
    return dcnv3_forward(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                         dilation_w, group, group_channels, offset_scale, remove_center, mask_softmax)

