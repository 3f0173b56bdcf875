"""ImageNet label names shipped with the package (no download needed)."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

IMAGENET_1K = 1000
IMAGENET_22K = 21841


@cache
def _load(name: str) -> tuple[str, ...]:
    text = resources.files("internimage_hf").joinpath("data", name).read_text(encoding="utf-8")
    return tuple(entry["label"] for entry in json.loads(text))


def imagenet_labels(num_classes: int) -> dict[int, str] | None:
    """id2label for an ImageNet-1k or -22k head; None for any other head size."""
    if num_classes == IMAGENET_1K:
        labels = _load("imagenet1k_labels.json")
    elif num_classes == IMAGENET_22K:
        labels = _load("imagenet22k_labels.json")
    else:
        return None
    return dict(enumerate(labels))
