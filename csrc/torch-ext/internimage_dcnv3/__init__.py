"""DCNv3 core op (InternImage) as a Hub/local kernel: compiled CPU and CUDA implementations.

`dcnv3_core(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
group, group_channels, offset_scale, remove_center, mask_softmax=False)` takes the official argument order,
channels-last tensors, and is differentiable in input, offset and mask (with mask_softmax, the mask is given as
logits and softmaxed over each pixel and group's points inside the op). The ops are registered with a fake (meta)
implementation and an autograd formula, so `torch.compile(fullgraph=True)` traces through them.

`dcnv4_core(input, offset_mask, kernel_h, ..., group, group_channels, offset_scale, remove_center)` is the DCNv4 core
("dcnv4" in FEATURES): one packed offset_mask tensor (per group 2P offsets then P weights, used as they are), exact
pixel coordinates; differentiable in input and offset_mask.

Only relative imports, the standard library and torch are used here (a Hub kernel requirement).
"""

from __future__ import annotations

from . import layers
from .functional import (
    FEATURES,
    backends,
    cpu_isa,
    dcnv3_backward,
    dcnv3_core,
    dcnv3_forward,
    dcnv4_backward,
    dcnv4_core,
    dcnv4_forward,
    supports,
)

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
    "layers",
    "FEATURES",
]
