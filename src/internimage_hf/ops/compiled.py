"""A loaded DCNv3 kernel (Hub kernel or local build) behind the small interface `dispatch.py` uses: the DCNv3 op
(`__call__`) and, in builds that have it, the DCNv4 op (`dcnv4`, `supports_dcnv4`).

The kernel package itself (csrc/torch-ext/internimage_dcnv3) registers the ops' fake implementations and autograd
formula, so what is wrapped here is already differentiable and traceable by `torch.compile`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from types import ModuleType

import torch

from .reference import point_softmax


class DCNv3KernelWarning(UserWarning):
    """The compiled DCNv3 kernel is not used (the pure-PyTorch reference runs instead); the message says why."""


_REQUIRED = ("dcnv3_core", "supports", "backends")
_device_warned: set[str] = set()


def _warn_missing_device(device: str, source: str) -> bool:
    if device not in _device_warned:
        _device_warned.add(device)
        hint = (
            "rebuild it with `internimage-hf build-kernels --cuda` (needs a CUDA build of torch and nvcc)"
            if device == "cuda"
            else "rebuild it on a torch build with that backend"
        )
        warnings.warn(
            f"The compiled DCNv3 kernel ({source}) has no {device} implementation; {device} inputs use "
            f"the pure-PyTorch reference (slow). To fix: {hint}.",
            DCNv3KernelWarning,
            stacklevel=4,
        )
    return True


# Runs eagerly even inside torch.compile (what torch.compiler.assume_constant_result sets; set directly here so
# that loading a kernel does not import torch._dynamo).
_warn_missing_device._dynamo_marked_constant = True  # type: ignore[attr-defined]

_op_warned: set[tuple[str, str]] = set()


def _warn_missing_op(op: str, source: str) -> bool:
    """One warning per (op, kernel) for a build older than the op (its inputs then take the reference)."""
    if (op, source) not in _op_warned:
        _op_warned.add((op, source))
        warnings.warn(
            f"The compiled DCNv3 kernel ({source}) was built without the {op} op; {op} uses the pure-PyTorch "
            "reference (slow). To fix: rebuild it with `internimage-hf build-kernels`.",
            DCNv3KernelWarning,
            stacklevel=4,
        )
    return True


_warn_missing_op._dynamo_marked_constant = True  # type: ignore[attr-defined]


class CompiledDCNv3:
    """Callable with the official DCNv3 arguments; `supports(input)` says whether this kernel handles the input."""

    def __init__(self, module: ModuleType, source: str, path: Path | None = None):
        missing = [name for name in _REQUIRED if not hasattr(module, name)]
        if missing:
            raise ImportError(f"{source} is not a DCNv3 kernel (missing {', '.join(missing)})")
        self.module = module
        self.source = source
        self.path = path
        self.backends = tuple(module.backends())
        self._core = module.dcnv3_core
        self._supports = module.supports
        features = getattr(module, "FEATURES", ())
        # Kernels built before the fused mask softmax existed get softmaxed masks from Python instead.
        self.fuses_mask_softmax = "mask_softmax" in features
        # ... and those built before DCNv4 leave it to the reference (`has_dcnv4` False, `dcnv4` None).
        self.has_dcnv4 = "dcnv4" in features and callable(getattr(module, "dcnv4_core", None))
        self.dcnv4 = module.dcnv4_core if self.has_dcnv4 else None

    def supports(self, input: torch.Tensor) -> bool:
        if self._supports(input):
            return True
        if input.device.type not in self.backends:
            _warn_missing_device(input.device.type, self.source)
        return False

    def supports_dcnv4(self, input: torch.Tensor) -> bool:
        """Whether `dcnv4` handles `input` (False, after one warning, for a build without DCNv4)."""
        if not self.has_dcnv4:
            _warn_missing_op("DCNv4", self.source)
            return False
        return self.supports(input)

    def __call__(self, *args, mask_softmax: bool = False) -> torch.Tensor:
        """The DCNv3 op on `dcnv3_core`'s positional arguments (input, offset, mask, ..., remove_center)."""
        if not mask_softmax:
            return self._core(*args)
        if self.fuses_mask_softmax:
            return self._core(*args, True)
        input, offset, mask, *params = args  # a build without the fused softmax: softmax in PyTorch first
        return self._core(input, offset, point_softmax(mask, params[8]), *params)

    def __repr__(self) -> str:
        return f"CompiledDCNv3(source={self.source!r}, backends={self.backends})"


__all__ = ["CompiledDCNv3", "DCNv3KernelWarning"]
