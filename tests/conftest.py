"""Shared test fixtures: where the official parity fixtures live, and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("INTERNIMAGE_FIXTURES", REPO.parent / "shared" / "fixtures" / "official"))
MODEL_CASES = ("tiny_t", "tiny_l", "tiny_h", "tiny_g")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"official fixtures not found at {FIXTURES} (set INTERNIMAGE_FIXTURES)")
    return FIXTURES


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Tests never touch the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
