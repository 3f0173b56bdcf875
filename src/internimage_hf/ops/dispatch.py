"""Choose the DCNv3 / DCNv4 implementation per call: a compiled kernel when one is available, else the reference."""

from __future__ import annotations

import os

import torch
from torch import nn

from .reference import check_dcnv3_params, check_dcnv4_args, dcnv3_core_reference, dcnv4_core_reference

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
            return op(*args[:-1], mask_softmax=mask_softmax)
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
    `dcnv4_core_reference`. backend: as for `dcnv3_core` (the same rules and the same compiled kernel package; a
    build made before DCNv4 existed leaves it to the reference, after one warning, or raises under "compiled")."""
    args = (
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
    choice = resolve_backend(backend)
    if choice != "reference" and not torch.jit.is_scripting() and not _exporting():
        op = _compiled_op(required=choice == "compiled")
        if op is not None and choice == "compiled" and not op.has_dcnv4:
            raise RuntimeError(
                f"DCNv4 backend 'compiled' was requested but the compiled kernel ({op.source}) was built without "
                "the DCNv4 op. To fix: rebuild it with `internimage-hf build-kernels`."
            )
        if (
            op is not None
            and isinstance(offset_mask, torch.Tensor)
            and op.supports_dcnv4(input)
            and input.dim() == 4
            and offset_mask.device == input.device
        ):
            # The reference's ValueError/TypeError for every bad argument or shape, before any C++ runs.
            check_dcnv4_args(*args)
            return op.dcnv4(*args)
    return dcnv4_core_reference(*args)


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
DCNV4_LAYER_NAME = "DCNv4Core"  # likewise for DCNv4 (`layers.DCNv4Core`)


class _DispatchingCore(nn.Module):
    """A stateless core whose class `forward` is the pure-PyTorch reference (what `kernels` falls back to and what
    `from_pretrained(..., use_kernels=False)` runs) and whose new instances dispatch through the op's dispatcher
    (`_dispatch_forward`: compiled op if available, `INTERNIMAGE_DCNV3_BACKEND`) until `kernelize` replaces or resets
    their forward (the instance attribute `forward`, the way `kernels` swaps layers)."""

    _dispatcher = None  # the op's dispatcher (`dcnv3_core`, `dcnv4_core`), set by each core

    def __init__(self):
        super().__init__()
        self.forward = self._dispatch_forward

    def _dispatch_forward(self, *args, **kwargs) -> torch.Tensor:
        """The instance forward of a new core: the class forward's arguments, to the op's dispatcher."""
        return self._dispatcher(*args, **kwargs)


@use_kernel_forward_from_hub(LAYER_NAME)
class DCNv3Core(_DispatchingCore):
    """Stateless DCNv3 core, the unit a Hub kernel layer replaces (`kernels.kernelize`, `from_pretrained(...,
    use_kernels=True)`); the mapping for cpu and cuda is registered by `internimage_hf.ops.hub` on import. Class
    forward: `dcnv3_core_reference`; instances: `dcnv3_core` (see `_DispatchingCore`)."""

    _dispatcher = staticmethod(dcnv3_core)

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


@use_kernel_forward_from_hub(DCNV4_LAYER_NAME)
class DCNv4Core(_DispatchingCore):
    """Stateless DCNv4 core, swapped by `kernels` like `DCNv3Core` (mapping "DCNv4Core" for cpu and cuda, registered
    by `internimage_hf.ops.hub`). Class forward: `dcnv4_core_reference`; instances: `dcnv4_core`."""

    _dispatcher = staticmethod(dcnv4_core)

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


def use_reference(model: nn.Module) -> nn.Module:
    """Every `DCNv3Core` and `DCNv4Core` of `model` back on its class forward, the pure-PyTorch reference (what
    `from_pretrained(..., use_kernels=False)` does); returns `model`."""
    for module in model.modules():
        if isinstance(module, _DispatchingCore):
            module.__dict__.pop("forward", None)
            module.__dict__.pop("_kernel_repo", None)
    return model
