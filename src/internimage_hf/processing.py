"""Preprocessing: the official eval transform expressed with a stock transformers image processor."""

from __future__ import annotations

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def make_image_processor(size: int = 224):
    """Resize the shorter side to `size` (bicubic), centre-crop size x size, scale to [0, 1], ImageNet mean/std.

    `BitImageProcessor` does exactly this at every size (ConvNeXt's processor warps instead of cropping at >= 384).
    The PIL backend is used so results do not depend on whether torchvision is installed.
    """
    try:
        from transformers import BitImageProcessorPil as processor_class
    except ImportError:  # pragma: no cover - transformers without split backends
        from transformers import BitImageProcessor as processor_class
    return processor_class(
        do_resize=True,
        size={"shortest_edge": int(size)},
        resample=3,  # PIL bicubic
        do_center_crop=True,
        crop_size={"height": int(size), "width": int(size)},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )
