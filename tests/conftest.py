"""Shared test fixtures: where the official parity fixtures live, and small helpers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from internimage_hf.ops import loader
from internimage_hf.ops.build import build_kernels
from internimage_hf.utils import relative_error

REPO = Path(__file__).resolve().parents[1]
# Official parity fixtures, inside the repository (tests/fixtures/README.md); INTERNIMAGE_FIXTURES overrides.
FIXTURES = Path(os.environ.get("INTERNIMAGE_FIXTURES") or Path(__file__).resolve().parent / "fixtures" / "official")
collect_ignore = ["hf_shims"]  # stand-ins for transformers test helpers (see hf_shims/README.md), not tests
MODEL_CASES = ("tiny_t", "tiny_l", "tiny_h", "tiny_g")
# FlashInternImage (DCNv4) fixtures, also in the repository (tests/fixtures/flash/README.md).
FLASH_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "flash"
FLASH_MODEL_CASES = ("flash_tiny_t", "flash_tiny_l")


rel_err = relative_error  # ‖out − ref‖ / ‖ref‖ in float64


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"official fixtures not found at {FIXTURES} (set INTERNIMAGE_FIXTURES)")
    return FIXTURES


@pytest.fixture(scope="session")
def flash_fixtures_dir() -> Path:
    if not FLASH_FIXTURES.is_dir():
        pytest.fail(f"FlashInternImage fixtures not found at {FLASH_FIXTURES}")
    return FLASH_FIXTURES


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Tests never touch the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------- the compiled DCNv3 kernel, built once per session
def _has_compiler() -> bool:
    return any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "c++", "g++", "clang++"))


@pytest.fixture(scope="session")
def kernel_dir() -> Path:
    """Build (or reuse) the kernel once per session; returns the variant folder."""
    if not _has_compiler():
        pytest.skip("no C++ compiler: the compiled DCNv3 kernel cannot be built here")
    try:
        path = build_kernels(cuda=False)
    except Exception as err:  # a compiler is present, so a failed build is a failure, not a skip
        pytest.fail(f"building the DCNv3 kernel failed: {err}")
    return path


@pytest.fixture(scope="session")
def kernel(kernel_dir):
    """The loaded kernel package, through the same loader `dcnv3_core` uses."""
    saved = os.environ.get("INTERNIMAGE_HF_KERNEL_CACHE")
    os.environ["INTERNIMAGE_HF_KERNEL_CACHE"] = str(kernel_dir.parents[1])
    loader._reset()
    try:
        op = loader.get_compiled_op(required=True)
    finally:
        if saved is None:
            os.environ.pop("INTERNIMAGE_HF_KERNEL_CACHE")
        else:
            os.environ["INTERNIMAGE_HF_KERNEL_CACHE"] = saved
    assert op.path == kernel_dir
    return op.module


@pytest.fixture
def use_kernel(kernel, kernel_dir, monkeypatch):
    """dcnv3_core's loader resolves to the session's build (other tests may have decided differently)."""
    monkeypatch.setenv("INTERNIMAGE_HF_KERNEL_CACHE", str(kernel_dir.parents[1]))
    monkeypatch.delenv("INTERNIMAGE_DCNV3_KERNEL_REPO", raising=False)
    monkeypatch.delenv("INTERNIMAGE_DCNV3_BACKEND", raising=False)
    loader._reset()
    yield kernel
    loader._reset()
