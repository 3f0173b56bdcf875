"""Choose the DCNv3 implementation per call: a compiled kernel when one is available, else the reference."""

from __future__ import annotations

import os

import torch
from torch import nn

from .reference import check_dcnv3_params, dcnv3_core_reference, dcnv4_core_reference

BACKEND_ENV = "INTERNIMAGE_DCNV3_BACKEND"
BACKENDS = ("auto", "compiled", "reference")


def resolve_backend(backend: str | None = None) -> str:
    """The backend to use: the argument, else $INTERNIMAGE_DCNV3_BACKEND, else "auto"."""
    choice = backend if backend is not None else os.environ.get(BACKEND_ENV, "auto")
    choice = choice.strip().lower()
    if choice not in BACKENDS:
        raise ValueError(f"Unknown DCNv3 backend {choice!r}; choose one of {', '.join(BACKENDS)}")
    return choice


def _compiled_op(required: bool):
    """The compiled op, or None. Decided once per process by `loader` (never at import time)."""
    from .loader import get_compiled_op

    return get_compiled_op(required=required)


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
    backend: str | None = None,
) -> torch.Tensor:
    """DCNv3 core op (official argument order, channels-last). The math: `dcnv3_core_reference`.

    mask_softmax: `mask` holds logits; the softmax over each (pixel, group)'s points is done in the op (fused into
    the compiled CPU kernel: one pass over memory fewer than softmax, then the op).

    backend: "auto" (compiled if available, else reference with one warning), "compiled" (error if unavailable),
    "reference" (pure PyTorch). Default: $INTERNIMAGE_DCNV3_BACKEND or "auto".
    """
    args = (
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
    choice = resolve_backend(backend)
    if choice != "reference" and not torch.jit.is_scripting() and not _exporting():
        op = _compiled_op(required=choice == "compiled")
        if (
            op is not None
            and op.supports(input)
            and input.dim() == 4
            and offset.device == input.device
            and mask.device == input.device
        ):
            # The rules no kernel may see broken (zero points, non-finite offset_scale, an empty output): one
            # ValueError, the reference's, before any C++ runs. Shapes and dtypes the kernel checks itself.
            check_dcnv3_params(
                input.shape[1],
                input.shape[2],
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
            return op(*args)
    return dcnv3_core_reference(*args)


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
    backend: str | None = None,
) -> torch.Tensor:
    """DCNv4 core op (the official argument order without its launch-tuning arguments, channels-last). The math:
    `dcnv4_core_reference`. backend: as for `dcnv3_core`."""
    resolve_backend(backend)
    return dcnv4_core_reference(
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


def _exporting() -> bool:
    """ONNX/torch.export use the reference path: it is made of standard ops every exporter knows."""
    onnx = getattr(torch, "onnx", None)
    if onnx is not None and hasattr(onnx, "is_in_onnx_export") and onnx.is_in_onnx_export():
        return True  # torch.onnx.export, TorchScript-based or dynamo-based (the latter sets it too)
    # torch.export.export (which sets no ONNX flag) and the exporters built on it.
    is_exporting = getattr(getattr(torch, "compiler", None), "is_exporting", None)
    return bool(is_exporting is not None and is_exporting())


try:  # the decorator transformers' own layers use (e.g. deformable DETR's MultiScaleDeformableAttention)
    from kernels import use_kernel_forward_from_hub
except ImportError:  # pragma: no cover - `kernels` is a dependency; without it the layer simply is not swappable

    def use_kernel_forward_from_hub(layer_name):
        return lambda cls: cls


LAYER_NAME = "DCNv3Core"  # the name of the layer in `kernels`' mapping and in the kernel package (`layers.DCNv3Core`)


@use_kernel_forward_from_hub(LAYER_NAME)
class DCNv3Core(nn.Module):
    """Stateless DCNv3 core, the unit a Hub kernel layer replaces (`kernels.kernelize`, `from_pretrained(...,
    use_kernels=True)`); the mapping for cpu and cuda is registered by `internimage_hf.ops.hub` on import.

    The class's `forward` is the pure-PyTorch reference: what `kernels` falls back to and what
    `from_pretrained(..., use_kernels=False)` runs. A new instance (a model built from a config) dispatches through
    `dcnv3_core` instead (compiled op if available, `INTERNIMAGE_DCNV3_BACKEND`), until `kernelize` replaces or
    resets its forward (the instance attribute `forward`, the way `kernels` swaps layers)."""

    def __init__(self):
        super().__init__()
        self.forward = self._dispatch_forward

    def forward(
        self,
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
        return dcnv3_core_reference(
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

    def _dispatch_forward(
        self,
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
        return dcnv3_core(
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


class DCNv4Core(nn.Module):
    """Stateless DCNv4 core: the unit a model layer calls (placeholder until the kernel branch's Hub-kernel layer
    lands; it only forwards to `dcnv4_core`)."""

    def forward(
        self,
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
        return dcnv4_core(
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


def use_reference(model: nn.Module) -> nn.Module:
    """Every `DCNv3Core` of `model` back on its class forward, the pure-PyTorch reference (what
    `from_pretrained(..., use_kernels=False)` does); returns `model`."""
    for module in model.modules():
        if isinstance(module, DCNv3Core):
            module.__dict__.pop("forward", None)
            module.__dict__.pop("_kernel_repo", None)
    return model
