"""DCNv3 and DCNv4 as Hub-kernel layers: the `kernels` mappings for `DCNv3Core` and `DCNv4Core` (cpu and cuda),
registered on import.

`dispatch.DCNv3Core` / `dispatch.DCNv4Core` are decorated with `use_kernel_forward_from_hub("DCNv3Core")` /
`("DCNv4Core")`, so `kernels.kernelize(model, device=..., mode=...)` and `AutoModel*.from_pretrained(...,
use_kernels=True)` (transformers' default from 5.25) look their layers up in `kernels`' global mapping. `register()`
puts one `CoreLayerRepository` per layer and device there. Registering reads no file and makes no request: the
repository decides on its first `load()` (the first `kernelize`), in the order of `loader.py` (both layers come
from the same kernel package, `layers.DCNv3Core` and `layers.DCNv4Core`):

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

The layer swapped in (`guarded_layer`) runs the kernel package's own `layers.<name>.forward` for the inputs the
kernel supports (the same op and arguments as the dispatcher's compiled path) and the reference for the rest
(float16 on the CPU, a device the build lacks, export), like the dispatcher. A kernel package older than DCNv4 has no
`layers.DCNv4Core`: that layer then degrades like any other kernel fault (one warning, the reference).
"""

from __future__ import annotations

import inspect
import os
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .compiled import CompiledDCNv3, DCNv3KernelWarning
from .dispatch import DCNV4_LAYER_NAME, LAYER_NAME, DCNv3Core, DCNv4Core, _exporting, resolve_backend
from .loader import (
    FIX_HINT,
    REPO_ENV,
    RESET_HOOKS,
    REVISION_ENV,
    VERSION_ENV,
    local_build_problem,
    local_build_variants,
)
from .reference import dcnv3_core_reference, dcnv4_core_reference

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class CoreLayer:
    """What differs between the swappable cores: the layer's name (in `kernels`' mapping and in the kernel package's
    `layers`), internimage_hf's layer (whose class forward signature is the contract), the reference function, and
    whether a loaded kernel package has the op at all."""

    name: str
    core: type[nn.Module]
    reference: Callable[..., torch.Tensor]
    available: Callable[[CompiledDCNv3], bool]


CORE_LAYERS = {
    LAYER_NAME: CoreLayer(LAYER_NAME, DCNv3Core, dcnv3_core_reference, lambda op: True),
    DCNV4_LAYER_NAME: CoreLayer(DCNV4_LAYER_NAME, DCNv4Core, dcnv4_core_reference, lambda op: op.has_dcnv4),
}


def _input_of(args: tuple, kwargs: dict):
    return args[0] if args else kwargs.get("input")


def _with_signature(forward, layer: CoreLayer):
    """`forward(self, *args, **kwargs)` presented with the signature of the layer's forward (what `kernels` compares
    when it swaps a layer in)."""
    forward.__signature__ = inspect.signature(layer.core.forward)
    return forward


def reference_layer(layer: CoreLayer) -> type[nn.Module]:
    """The layer `kernelize` gets when no kernel can be used: the pure-PyTorch reference (stateless, like a Hub
    layer, so that `kernels` accepts it)."""

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return layer.reference(*args, **kwargs)

    cls = type(
        f"Reference{layer.name}",
        (nn.Module,),
        {"forward": _with_signature(forward, layer), "has_backward": True, "can_torch_compile": True},
    )
    cls.__module__ = __name__
    return cls


ReferenceDCNv3Core = reference_layer(CORE_LAYERS[LAYER_NAME])
ReferenceDCNv4Core = reference_layer(CORE_LAYERS[DCNV4_LAYER_NAME])
REFERENCE_LAYERS = {LAYER_NAME: ReferenceDCNv3Core, DCNV4_LAYER_NAME: ReferenceDCNv4Core}


def guarded_layer(kernel_layer: type[nn.Module], source: str, layer_name: str = LAYER_NAME) -> type[nn.Module]:
    """A stateless layer that runs `kernel_layer` (a kernel package's `layers.<layer_name>`) where its package
    supports the input, else the reference. Raises if `kernel_layer` does not take the arguments of internimage_hf's
    layer or its package lacks the op."""
    layer = CORE_LAYERS[layer_name]
    package = sys.modules.get(kernel_layer.__module__.rpartition(".")[0])
    if package is None:
        raise ImportError(f"{source}: the package of {kernel_layer.__module__} is not imported")
    op = CompiledDCNv3(package, source=source)  # checks the package's interface; warns once per missing device
    if not layer.available(op):
        raise ImportError(f"{source} has no {layer_name} op (built before it existed)")
    expected = list(inspect.signature(layer.core.forward).parameters)
    if list(inspect.signature(kernel_layer.forward).parameters) != expected:
        raise TypeError(f"{source}: `{layer_name}.forward` does not take the arguments of internimage_hf's layer")
    kernel_forward = kernel_layer.forward
    reference = layer.reference

    def forward(self, *args, **kwargs) -> torch.Tensor:
        input = _input_of(args, kwargs)
        if (
            not torch.jit.is_scripting()
            and not _exporting()
            and isinstance(input, torch.Tensor)
            and input.dim() == 4
            # every tensor argument (offset and mask, or offset_mask) on the input's device
            and all(a.device == input.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
            and op.supports(input)
        ):
            return kernel_forward(self, *args, **kwargs)
        return reference(*args, **kwargs)

    cls = type(
        f"{layer_name}Kernel",
        (nn.Module,),
        {
            "forward": _with_signature(forward, layer),
            "has_backward": bool(getattr(kernel_layer, "has_backward", True)),
            "can_torch_compile": bool(getattr(kernel_layer, "can_torch_compile", False)),
        },
    )
    cls.__module__ = __name__
    return cls


class CoreLayerRepository:
    """What the `kernels` mapping holds for one core layer (`DCNv3Core` or `DCNv4Core`) on one device type (see the
    module docstring).

    Implements kernels' repository protocol (`layer_name`, `load()`). The decision is made once (on the first
    `load`) and kept until `loader._reset()`; `source` and `problems` say what was decided."""

    def __init__(self, device: str, layer_name: str = LAYER_NAME):
        self.device = device
        self.layer_name = layer_name
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

        name = self.layer_name
        what = name.removesuffix("Core")  # DCNv3 / DCNv4, in messages
        reference = REFERENCE_LAYERS[name]
        problems: list[str] = []
        self.source, self.problems = None, problems
        try:
            choice = resolve_backend()
        except ValueError as err:
            problems.append(str(err))
            choice = "auto"
        if choice == "reference":
            return reference

        repo_id = os.environ.get(REPO_ENV, "").strip()
        if repo_id:
            revision = os.environ.get(REVISION_ENV, "").strip() or None
            try:
                version = None if revision else int(os.environ.get(VERSION_ENV, "1"))
                source = f"Hub kernel {repo_id} ({f'revision {revision}' if revision else f'version {version}'})"
                repo = kernels.LayerRepository(
                    repo_id, layer_name=name, revision=revision, version=version, trust_remote_code=[repo_id]
                )
                return self._accept(guarded_layer(repo.load(), source, name), source)
            except Exception as err:  # offline, unreachable, untrusted, digest mismatch, wrong GPU architecture...
                problems.append(f"the Hub kernel {repo_id} could not be loaded ({type(err).__name__}: {err})")

        root, variants = local_build_variants(problems)
        checked = [(path, local_build_problem(path)) for path in variants]
        problems.extend(problem for _, problem in checked if problem is not None)
        if variants and all(problem is None for _, problem in checked):
            source = f"local build {root}"
            try:
                repo = kernels.LocalLayerRepository(repo_path=Path(root), layer_name=name)
                return self._accept(guarded_layer(repo.load(), source, name), source)
            except Exception as err:  # no variant kernels accepts, ABI mismatch, wrong GPU architecture...
                problems.append(f"the kernel build in {root} could not be loaded ({type(err).__name__}: {err})")

        if choice == "compiled":
            raise RuntimeError(
                f"{what} backend 'compiled' was requested but no compiled kernel layer is available for "
                f"{self.device}: {'; '.join(problems)}. To fix: build the kernel with `internimage-hf build-kernels` "
                "(needs a C++ compiler; add --cuda for GPUs)."
            )
        warnings.warn(
            f"{what} layers kernelized for {self.device} run the pure-PyTorch reference (slow): "
            f"{'; '.join(problems)}. To fix: {FIX_HINT}.",
            DCNv3KernelWarning,
            stacklevel=2,
        )
        return reference

    def _accept(self, layer: type[nn.Module], source: str) -> type[nn.Module]:
        self.source = source
        if self.problems:  # e.g. the configured Hub kernel failed but the local build works
            what = self.layer_name.removesuffix("Core")
            warnings.warn(f"{what} layers use {source}: {'; '.join(self.problems)}.", DCNv3KernelWarning, stacklevel=3)
        return layer

    def _forget(self) -> None:
        with self._lock:
            self._layer, self.source, self.problems = None, None, []

    def __str__(self) -> str:
        decided = self.source or "undecided or reference"
        return f"internimage_hf {self.layer_name} kernel layer for {self.device} ({decided})"

    # One repository per layer, device and process: `kernels.use_kernel_mapping` deep-copies the mapping it inherits,
    # and a copy must keep the decision (and kernels' cache key), so copies are the object itself.
    def __copy__(self) -> CoreLayerRepository:
        return self

    def __deepcopy__(self, memo) -> CoreLayerRepository:
        return self

    def __reduce__(self):
        return _repository, (self.device, self.layer_name)


DCNv3LayerRepository = CoreLayerRepository  # the name before DCNv4 existed


def _repository(device: str, layer_name: str = LAYER_NAME) -> CoreLayerRepository:
    return LAYER_REPOSITORIES[layer_name][device]


LAYER_REPOSITORIES = {name: {device: CoreLayerRepository(device, name) for device in DEVICES} for name in CORE_LAYERS}
REPOSITORIES = LAYER_REPOSITORIES[LAYER_NAME]  # DCNv3Core's, by device
DCNV4_REPOSITORIES = LAYER_REPOSITORIES[DCNV4_LAYER_NAME]


def kernel_mapping() -> dict:
    """The mappings registered: {"DCNv3Core": {"cpu": repository, "cuda": repository}, "DCNv4Core": {...}}."""
    return {name: dict(repos) for name, repos in LAYER_REPOSITORIES.items()}


def register() -> bool:
    """Add the DCNv3 and DCNv4 mappings to `kernels`' global mapping (on import of internimage_hf.ops). False if
    `kernels` is missing or refuses it (the layers then stay on their own forward)."""
    try:
        from kernels import register_kernel_mapping

        register_kernel_mapping(kernel_mapping())
    except Exception:  # an older or newer kernels without this API: not swappable, nothing else changes
        return False
    return True


def _all_repositories() -> list[CoreLayerRepository]:
    return [repo for repos in LAYER_REPOSITORIES.values() for repo in repos.values()]


def _reset() -> None:
    """Forget the decisions (and the layers `kernels` cached for our repositories)."""
    for repo in _all_repositories():
        repo._forget()
    try:
        import kernels

        cache = getattr(sys.modules[kernels.LocalLayerRepository.__module__], "_CACHED_LAYER", None)
    except Exception:  # kernels missing or reorganised
        return
    if isinstance(cache, dict):
        for repo in _all_repositories():
            cache.pop(repo, None)


RESET_HOOKS.append(_reset)


__all__ = [
    "CORE_LAYERS",
    "CoreLayerRepository",
    "DCNv3LayerRepository",
    "ReferenceDCNv3Core",
    "ReferenceDCNv4Core",
    "guarded_layer",
    "kernel_mapping",
    "reference_layer",
    "register",
]
