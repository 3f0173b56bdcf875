"""Finding the compiled DCNv3 kernel, once per process, on first use (never at import time).

Order:
1. a Hub kernel, only when configured: $INTERNIMAGE_DCNV3_KERNEL_REPO (e.g. "org/internimage-dcnv3"), with
   $INTERNIMAGE_DCNV3_KERNEL_VERSION (default 1) or $INTERNIMAGE_DCNV3_KERNEL_REVISION, loaded by
   `kernels.get_kernel` (which honours LOCAL_KERNELS and HF_HUB_OFFLINE). Naming the repo is the opt-in to run its
   code, so it is passed as trusted;
2. the local build made by `internimage-hf build-kernels` in $INTERNIMAGE_HF_KERNEL_CACHE or
   ~/.cache/internimage_hf/kernels, if it was built from the current sources for the running torch;
3. nothing: `dcnv3_core` then runs the pure-PyTorch reference. With backend "auto" that happens after one
   `DCNv3KernelWarning` per process saying why and how to fix it; with backend "compiled" it is an error.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .buildrecord import KernelCacheError, build_record, verify_build
from .compiled import CompiledDCNv3, DCNv3KernelWarning

REPO_ENV = "INTERNIMAGE_DCNV3_KERNEL_REPO"
VERSION_ENV = "INTERNIMAGE_DCNV3_KERNEL_VERSION"
REVISION_ENV = "INTERNIMAGE_DCNV3_KERNEL_REVISION"

FIX_HINT = (
    "build the kernel with `internimage-hf build-kernels` (needs a C++ compiler; add --cuda for GPUs), "
    "or set INTERNIMAGE_DCNV3_BACKEND=reference to use the pure-PyTorch op without this warning"
)


@dataclass
class _State:
    decided: bool = False
    op: CompiledDCNv3 | None = None
    problems: list[str] = field(default_factory=list)  # why candidates were not used, in order
    warned: bool = False


_STATE = _State()
_LOCK = threading.Lock()


# Module names read from disk (a build's metadata id) are validated and then namespaced under this prefix, so that
# no metadata file can name (and replace) a module such as `os`, and so that our import of a build never takes the
# name `kernels` gives the same build (its metadata id): both can load it in one process.
MODULE_PREFIX = "_internimage_hf_dcnv3_build_"


def module_name(meta: dict) -> str:
    """The module name our loader gives a build: its validated metadata id, under our own prefix."""
    return MODULE_PREFIX + meta["id"]


def _import_variant(path: Path) -> CompiledDCNv3:
    """Import a built variant folder (validated and verified first) as a package under our namespaced module name,
    reusing an earlier import of the same folder."""
    meta, record = build_record(path)
    verify_build(path, record)
    name = module_name(meta)
    module = sys.modules.get(name)
    if module is None or Path(getattr(module, "__file__", "") or "").resolve().parent != path.resolve():
        spec = importlib.util.spec_from_file_location(
            name, path / "__init__.py", submodule_search_locations=[str(path)]
        )
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {path / '__init__.py'}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
                sys.modules.pop(key, None)
            raise
    return CompiledDCNv3(module, source=f"local build {path}", path=path)


def _local_candidates(root: Path) -> list[Path]:
    import torch

    from .build import torch_variant

    names = [torch_variant(cuda=True)] if torch.version.cuda is not None else []
    names.append(torch_variant(cuda=False))
    return [root / "build" / name for name in names]


def local_build_problem(path: Path) -> str | None:
    """Why the local build in the variant folder `path` must not be imported (stale, for another torch, a missing,
    modified or unsafe file: the record in metadata.json is checked against every file), or None if it may be.
    Nothing of it is imported here."""
    import torch

    from .build import source_digest, source_dir

    try:
        _, record = build_record(path)
        if record.get("torch") != torch.__version__:
            return f"the kernel build in {path} is for torch {record.get('torch')}, not {torch.__version__}"
        src = source_dir()
        if src is not None and record.get("source_digest") != source_digest(src):
            return f"the kernel build in {path} is out of date (built from other sources or build flags)"
        verify_build(path, record)
    except Exception as err:  # corrupt folder, missing or modified library...
        return f"the kernel build in {path} could not be loaded ({type(err).__name__}: {err})"
    return None


def local_build_variants(problems: list[str]) -> tuple[Path, list[Path]]:
    """(cache root, the variant folders for this torch that exist there); records a problem when there is none."""
    from .build import default_cache_dir

    root = default_cache_dir()
    candidates = [p for p in _local_candidates(root) if p.is_dir()]
    if not candidates:
        problems.append(f"no local kernel build for this torch in {root / 'build'}")
    return root, candidates


def _load_local(problems: list[str]) -> CompiledDCNv3 | None:
    _, candidates = local_build_variants(problems)
    for path in candidates:
        problem = local_build_problem(path)
        if problem is not None:
            problems.append(problem)
            continue
        try:
            return _import_variant(path)
        except Exception as err:  # corrupt folder, missing library, ABI mismatch...
            problems.append(f"the kernel build in {path} could not be loaded ({type(err).__name__}: {err})")
    return None


def _load_hub(problems: list[str]) -> CompiledDCNv3 | None:
    repo = os.environ.get(REPO_ENV, "").strip()
    if not repo:
        return None
    revision = os.environ.get(REVISION_ENV, "").strip() or None
    try:
        version = None if revision else int(os.environ.get(VERSION_ENV, "1"))
        import kernels

        module = kernels.get_kernel(repo, version=version, revision=revision, trust_remote_code=[repo])
        where = f"revision {revision}" if revision else f"version {version}"
        return CompiledDCNv3(module, source=f"Hub kernel {repo} ({where})")
    except Exception as err:  # offline and not cached, no network, no such repo, no variant for this torch...
        problems.append(f"the Hub kernel {repo} could not be loaded ({type(err).__name__}: {err})")
        return None


def _decide() -> None:
    problems: list[str] = []
    op = _load_hub(problems)
    if op is None:
        op = _load_local(problems)
    _STATE.op = op
    _STATE.problems = problems
    _STATE.decided = True


def _ensure_decided() -> bool:
    if not _STATE.decided:
        with _LOCK:
            if not _STATE.decided:
                try:
                    _decide()
                except Exception as err:  # never let kernel discovery break a forward pass
                    _STATE.op = None
                    _STATE.problems = [f"kernel discovery failed ({type(err).__name__}: {err})"]
                    _STATE.decided = True
    return True


def _warn_once() -> bool:
    if not _STATE.warned:
        _STATE.warned = True
        if _STATE.op is None:
            warnings.warn(
                f"DCNv3 runs on the pure-PyTorch reference (slow): {'; '.join(_STATE.problems)}. To fix: {FIX_HINT}.",
                DCNv3KernelWarning,
                stacklevel=4,
            )
        elif _STATE.problems:  # e.g. the configured Hub kernel failed but the local build works
            warnings.warn(
                f"DCNv3 uses {_STATE.op.source}: {'; '.join(_STATE.problems)}.", DCNv3KernelWarning, stacklevel=4
            )
    return True


# Both run eagerly even while torch.compile traces a model (what torch.compiler.assume_constant_result sets; set
# directly so that the first forward does not import torch._dynamo).
_ensure_decided._dynamo_marked_constant = True  # type: ignore[attr-defined]
_warn_once._dynamo_marked_constant = True  # type: ignore[attr-defined]


def get_compiled_op(required: bool = False) -> CompiledDCNv3 | None:
    """The compiled DCNv3 op, or None (after one warning) when there is none; required=True raises instead."""
    _ensure_decided()
    op = _STATE.op
    if op is None and required:
        raise RuntimeError(
            f"DCNv3 backend 'compiled' was requested but no compiled kernel is available: "
            f"{'; '.join(_STATE.problems)}. To fix: build the kernel with `internimage-hf "
            "build-kernels` (needs a C++ compiler; add --cuda for GPUs)."
        )
    if not required and (op is None or _STATE.problems):
        _warn_once()
    return op


def kernel_status() -> dict:
    """What `get_compiled_op` decided (deciding now if it has not yet): source, backends and the problems seen."""
    _ensure_decided()
    op = _STATE.op
    return {
        "source": op.source if op else None,
        "backends": op.backends if op else (),
        "problems": list(_STATE.problems),
    }


# Other decisions made once per process that depend on the same builds (`hub.py`'s kernel layers): forgotten by
# `_reset` too. (A list of callables, so that this module imports nothing that imports it.)
RESET_HOOKS: list = []


def _reset() -> None:
    """Forget the decision (tests; after `build_kernels` in a running process)."""
    with _LOCK:
        _STATE.decided = False
        _STATE.op = None
        _STATE.problems = []
        _STATE.warned = False
    for hook in RESET_HOOKS:
        hook()


__all__ = ["DCNv3KernelWarning", "KernelCacheError", "get_compiled_op", "kernel_status"]
