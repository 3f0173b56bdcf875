"""Small helpers shared by conversion, export and the tests."""

from __future__ import annotations

import torch


def relative_error(actual, expected) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64: the project's parity metric (the plain difference norm when the
    expected tensor is all zeros)."""
    actual = torch.as_tensor(actual).detach().double()
    expected = torch.as_tensor(expected).detach().double()
    scale = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / scale if scale > 0 else diff
