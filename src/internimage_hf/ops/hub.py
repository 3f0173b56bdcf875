"""DCNv3 as a Hub-kernel layer: the `kernels` mapping for `DCNv3Core` (cpu and cuda), registered on import.

`dispatch.DCNv3Core` is decorated with `use_kernel_forward_from_hub("DCNv3Core")`, so `kernels.kernelize(model,
device=..., mode=...)` and `AutoModel*.from_pretrained(..., use_kernels=True)` (transformers' default from 5.25) look
its layer up in `kernels`' global mapping. `register()` puts one `DCNv3LayerRepository` per device there. Registering
reads no file and makes no request: the repository decides on its first `load()` (the first `kernelize`), in the
order of `loader.py`:

1. the Hub kernel, only if $INTERNIMAGE_DCNV3_KERNEL_REPO names one (a `kernels.LayerRepository`, trusted because
   you named it; $INTERNIMAGE_DCNV3_KERNEL_VERSION / _REVISION as for the loader);
2. the local build of `internimage-hf build-kernels` as a `kernels.LocalLayerRepository`, after the loader's checks
   (torch version, source digest, size and SHA-256 of every file) have passed for every variant folder `kernels`
   may import: a corrupt or stale build is never handed to `kernels`;
3. else the reference layer, after one `DCNv3KernelWarning` that says why and how to fix it.

`load()` never raises for a kernel problem (no build, untrusted or unreachable repo, digest mismatch, wrong GPU
architecture, corrupt library: `kernels` and transformers catch only FileNotFoundError), except under
INTERNIMAGE_DCNV3_BACKEND=compiled, where it is the same RuntimeError a forward gives. With
INTERNIMAGE_DCNV3_BACKEND=reference it returns the reference layer without a warning.

The layer swapped in (`guarded_layer`) runs the kernel package's own `layers.DCNv3Core.forward` for the inputs the
kernel supports (the same op and arguments as `dcnv3_core`'s compiled path) and the reference for the rest (float16
on the CPU, a device the build lacks, export), like the dispatcher.
"""

from __future__ import annotations

import inspect
import os
import sys
import threading
import warnings
from pathlib import Path

import torch
from torch import nn

from .compiled import CompiledDCNv3, DCNv3KernelWarning
from .dispatch import LAYER_NAME, DCNv3Core, _exporting, resolve_backend
from .loader import (
    FIX_HINT,
    REPO_ENV,
    RESET_HOOKS,
    REVISION_ENV,
    VERSION_ENV,
    local_build_problem,
    local_build_variants,
)
from .reference import dcnv3_core_reference

DEVICES = ("cpu", "cuda")


class ReferenceDCNv3Core(nn.Module):
    """The layer `kernelize` gets when no kernel can be used: the pure-PyTorch reference (stateless, like a Hub
    layer, so that `kernels` accepts it)."""

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


def guarded_layer(kernel_layer: type[nn.Module], source: str) -> type[nn.Module]:
    """A stateless layer that runs `kernel_layer` (a kernel package's `layers.DCNv3Core`) where its package
    supports the input, else the reference. Raises if `kernel_layer` is not a DCNv3 layer of this signature."""
    package = sys.modules.get(kernel_layer.__module__.rpartition(".")[0])
    if package is None:
        raise ImportError(f"{source}: the package of {kernel_layer.__module__} is not imported")
    op = CompiledDCNv3(package, source=source)  # checks the package's interface; warns once per missing device
    expected = list(inspect.signature(DCNv3Core.forward).parameters)
    if list(inspect.signature(kernel_layer.forward).parameters) != expected:
        raise TypeError(f"{source}: `{LAYER_NAME}.forward` does not take the arguments of internimage_hf's layer")
    kernel_forward = kernel_layer.forward

    class DCNv3CoreKernel(nn.Module):
        has_backward = bool(getattr(kernel_layer, "has_backward", True))
        can_torch_compile = bool(getattr(kernel_layer, "can_torch_compile", False))

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
            if (
                not torch.jit.is_scripting()
                and not _exporting()
                and input.dim() == 4
                and offset.device == input.device
                and mask.device == input.device
                and op.supports(input)
            ):
                return kernel_forward(self, *args)
            return dcnv3_core_reference(*args)

    DCNv3CoreKernel.__qualname__ = DCNv3CoreKernel.__name__
    return DCNv3CoreKernel


class DCNv3LayerRepository:
    """What the `kernels` mapping holds for `DCNv3Core` on one device type (see the module docstring).

    Implements kernels' repository protocol (`layer_name`, `load()`). The decision is made once (on the first
    `load`) and kept until `loader._reset()`; `source` and `problems` say what was decided."""

    def __init__(self, device: str):
        self.device = device
        self.layer_name = LAYER_NAME
        self._lock = threading.Lock()
        self._layer: type[nn.Module] | None = None
        self.source: str | None = None  # None: the reference
        self.problems: list[str] = []

    def load(self) -> type[nn.Module]:
        with self._lock:
            if self._layer is None:
                self._layer = self._decide()
            return self._layer

    def _decide(self) -> type[nn.Module]:
        import kernels

        problems: list[str] = []
        self.source, self.problems = None, problems
        try:
            choice = resolve_backend()
        except ValueError as err:
            problems.append(str(err))
            choice = "auto"
        if choice == "reference":
            return ReferenceDCNv3Core

        repo_id = os.environ.get(REPO_ENV, "").strip()
        if repo_id:
            revision = os.environ.get(REVISION_ENV, "").strip() or None
            try:
                version = None if revision else int(os.environ.get(VERSION_ENV, "1"))
                source = f"Hub kernel {repo_id} ({f'revision {revision}' if revision else f'version {version}'})"
                repo = kernels.LayerRepository(
                    repo_id, layer_name=LAYER_NAME, revision=revision, version=version, trust_remote_code=[repo_id]
                )
                return self._accept(guarded_layer(repo.load(), source), source)
            except Exception as err:  # offline, unreachable, untrusted, digest mismatch, wrong GPU architecture...
                problems.append(f"the Hub kernel {repo_id} could not be loaded ({type(err).__name__}: {err})")

        root, variants = local_build_variants(problems)
        checked = [(path, local_build_problem(path)) for path in variants]
        problems.extend(problem for _, problem in checked if problem is not None)
        if variants and all(problem is None for _, problem in checked):
            source = f"local build {root}"
            try:
                repo = kernels.LocalLayerRepository(repo_path=Path(root), layer_name=LAYER_NAME)
                return self._accept(guarded_layer(repo.load(), source), source)
            except Exception as err:  # no variant kernels accepts, ABI mismatch, wrong GPU architecture...
                problems.append(f"the kernel build in {root} could not be loaded ({type(err).__name__}: {err})")

        if choice == "compiled":
            raise RuntimeError(
                f"DCNv3 backend 'compiled' was requested but no compiled kernel layer is available for "
                f"{self.device}: {'; '.join(problems)}. To fix: build the kernel with `internimage-hf build-kernels` "
                "(needs a C++ compiler; add --cuda for GPUs)."
            )
        warnings.warn(
            f"DCNv3 layers kernelized for {self.device} run the pure-PyTorch reference (slow): {'; '.join(problems)}. "
            f"To fix: {FIX_HINT}.",
            DCNv3KernelWarning,
            stacklevel=2,
        )
        return ReferenceDCNv3Core

    def _accept(self, layer: type[nn.Module], source: str) -> type[nn.Module]:
        self.source = source
        if self.problems:  # e.g. the configured Hub kernel failed but the local build works
            warnings.warn(f"DCNv3 layers use {source}: {'; '.join(self.problems)}.", DCNv3KernelWarning, stacklevel=3)
        return layer

    def _forget(self) -> None:
        with self._lock:
            self._layer, self.source, self.problems = None, None, []

    def __str__(self) -> str:
        return f"internimage_hf DCNv3 kernel layer for {self.device} ({self.source or 'undecided or reference'})"

    # One repository per device and process: `kernels.use_kernel_mapping` deep-copies the mapping it inherits, and
    # a copy must keep the decision (and kernels' cache key), so copies are the object itself.
    def __copy__(self) -> DCNv3LayerRepository:
        return self

    def __deepcopy__(self, memo) -> DCNv3LayerRepository:
        return self

    def __reduce__(self):
        return _repository, (self.device,)


def _repository(device: str) -> DCNv3LayerRepository:
    return REPOSITORIES[device]


REPOSITORIES = {device: DCNv3LayerRepository(device) for device in DEVICES}


def kernel_mapping() -> dict:
    """The mapping registered for `DCNv3Core`: {"DCNv3Core": {"cpu": repository, "cuda": repository}}."""
    return {LAYER_NAME: dict(REPOSITORIES)}


def register() -> bool:
    """Add the DCNv3 mapping to `kernels`' global mapping (on import of internimage_hf.ops). False if `kernels` is
    missing or refuses it (the layer then stays on its own forward)."""
    try:
        from kernels import register_kernel_mapping

        register_kernel_mapping(kernel_mapping())
    except Exception:  # an older or newer kernels without this API: not swappable, nothing else changes
        return False
    return True


def _reset() -> None:
    """Forget the decisions (and the layers `kernels` cached for our repositories)."""
    for repo in REPOSITORIES.values():
        repo._forget()
    try:
        import kernels

        cache = getattr(sys.modules[kernels.LocalLayerRepository.__module__], "_CACHED_LAYER", None)
    except Exception:  # kernels missing or reorganised
        return
    if isinstance(cache, dict):
        for repo in REPOSITORIES.values():
            cache.pop(repo, None)


RESET_HOOKS.append(_reset)


__all__ = ["DCNv3LayerRepository", "ReferenceDCNv3Core", "guarded_layer", "kernel_mapping", "register"]
