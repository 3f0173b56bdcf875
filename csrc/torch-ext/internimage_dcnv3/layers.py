"""Hub layers: stateless DCNv3 and DCNv4 cores that `kernels.kernelize` can swap in for internimage_hf's `DCNv3Core`
and `DCNv4Core`."""

from __future__ import annotations

import torch
from torch import nn

from .functional import dcnv3_core, dcnv4_core


class DCNv3Core(nn.Module):
    """DCNv3 core op as a layer with no state: every argument comes through `forward` (kernels' layer contract)."""

    has_backward = True
    can_torch_compile = True

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
    """DCNv4 core op as a layer with no state (kernels' layer contract): offset and weights in one packed tensor."""

    has_backward = True
    can_torch_compile = True

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


__all__ = ["DCNv3Core", "DCNv4Core"]
