"""Build the DCNv3 kernels from source (`internimage-hf build-kernels`) into a local `kernels`-style folder.

Layout written (a valid `kernels.get_local_kernel` repository):

    <cache>/build/<variant>/__init__.py, functional.py, layers.py   the Python package (csrc/torch-ext/
                                                                     internimage_dcnv3)
                            _ops.py                                  the op namespace of this build
                            _internimage_dcnv3_<tag>.so              the compiled ops
                            metadata.json                            id, name, version, license, python-depends,
                                                                     backend, and our own build record (with the
                                                                     size and SHA-256 of every file)

<cache> is $INTERNIMAGE_HF_KERNEL_CACHE or ~/.cache/internimage_hf/kernels; <variant> is
`torch{MAJ}{MIN}-cxx11-cpu-x86_64-linux` (CPU torch) or `torch{MAJ}{MIN}-cxx11-cu{XY}-x86_64-linux` (CUDA torch; such a
build holds the CPU kernels too). Compilation runs in a child process (so this process never loads a half-built
library), into a staging folder that is smoke-tested and then renamed into place.

What is compiled, and how, comes from csrc/build.toml, the file kernel-builder reads for Hub builds: the sources
(`[torch]` and `[kernel.dcnv3_cpu]` / `[kernel.dcnv3_cuda]`), their `cxx-flags` and `cuda-flags`, the CUDA
`cuda-capabilities`, and the kernel's name, version and license. Only what kernel-builder does by itself is added
here: optimisation (-O3), the stand-in for its generated registration.h (-DDCNV3_LOCAL_BUILD), the CUDA switch
(-DDCNV3_WITH_CUDA, kernel-builder's is CUDA_KERNEL) and the OpenMP link flag.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from .buildrecord import build_record, file_record, read_metadata, verify_build

KERNEL_NAME = "internimage-dcnv3"  # kernels/kernel-builder names use dashes (build.toml's general.name)
PACKAGE_NAME = "internimage_dcnv3"  # ... and their Python package the underscored form
CACHE_ENV = "INTERNIMAGE_HF_KERNEL_CACHE"
BUILD_TOML = "build.toml"
# The build.toml sections of the two kernels: a CPU build compiles [torch] and [kernel.dcnv3_cpu], a CUDA build
# [torch] and [kernel.dcnv3_cuda] (which lists the CPU sources too).
CPU_KERNEL = "dcnv3_cpu"
CUDA_KERNEL = "dcnv3_cuda"
COMPILED_SUFFIXES = (".cpp", ".cc", ".cu")
PACKAGE_DIR = f"torch-ext/{PACKAGE_NAME}"


class KernelBuildError(RuntimeError):
    """The DCNv3 kernel could not be built (no compiler, compile error, failed smoke test...)."""


def default_cache_dir() -> Path:
    """$INTERNIMAGE_HF_KERNEL_CACHE, else ~/.cache/internimage_hf/kernels."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "internimage_hf" / "kernels"


def source_dir() -> Path | None:
    """The kernel sources: `internimage_hf/csrc` in a wheel, the repository's `csrc/` in a source checkout."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[1] / "csrc", here.parents[3] / "csrc"):
        if (candidate / "build.toml").is_file() and (candidate / PACKAGE_DIR / "__init__.py").is_file():
            return candidate
    return None


def _source_files(src: Path) -> list[Path]:
    files = [
        p
        for p in src.rglob("*")
        if p.is_file() and p.suffix in {".h", ".cpp", ".cu", ".cuh", ".py", ".toml"} and "__pycache__" not in p.parts
    ]
    return sorted(files, key=lambda p: p.relative_to(src).as_posix())


def _require_src(src: Path | None) -> Path:
    src = src or source_dir()
    if src is None:
        raise KernelBuildError("DCNv3 kernel sources (csrc/) not found in this installation")
    return src


def build_config(src: Path | None = None) -> dict:
    """csrc/build.toml, parsed (the kernel-builder configuration that the local build follows too)."""
    path = _require_src(src) / BUILD_TOML
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise KernelBuildError(f"cannot read the kernel configuration {path}: {exc}") from exc


def _kernel_section(config: dict, cuda: bool) -> dict:
    name = CUDA_KERNEL if cuda else CPU_KERNEL
    try:
        return config["kernel"][name]
    except (KeyError, TypeError):
        raise KernelBuildError(f"build.toml has no [kernel.{name}] section") from None


def _string_list(section: dict, key: str) -> list[str]:
    value = section.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise KernelBuildError(f"build.toml: `{key}` must be a list of strings, got {value!r}")
    return list(value)


def build_sources(src: Path | None = None, cuda: bool = False) -> list[str]:
    """The files a build compiles (paths relative to csrc/): the compiled sources of [torch] and of the CPU or CUDA
    kernel's section of build.toml, in that order (headers are listed there too, for kernel-builder)."""
    config = build_config(src)
    listed = _string_list(config.get("torch", {}), "src") + _string_list(_kernel_section(config, cuda), "src")
    return [s for s in dict.fromkeys(listed) if s.endswith(COMPILED_SUFFIXES)]


def cuda_capabilities(src: Path | None = None) -> list[str]:
    """The CUDA capabilities of build.toml's CUDA kernel, e.g. ["7.5", ..., "12.0+PTX"]."""
    caps = _string_list(_kernel_section(build_config(src), True), "cuda-capabilities")
    if not caps:
        raise KernelBuildError("build.toml: [kernel.dcnv3_cuda] lists no cuda-capabilities")
    return caps


def nvcc_capabilities(nvcc: str | os.PathLike | None = None) -> set[str] | None:
    """The real architectures the CUDA compiler can generate code for (from `nvcc --list-gpu-code`), as capabilities
    ("7.5", "12.0", ...); None when that cannot be asked (no nvcc, or one too old to answer)."""
    if nvcc is None:
        from torch.utils.cpp_extension import CUDA_HOME

        nvcc = str(Path(CUDA_HOME) / "bin" / "nvcc") if CUDA_HOME else shutil.which("nvcc")
        if nvcc is None:
            return None
    try:
        out = subprocess.run(
            [str(nvcc), "--list-gpu-code"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    caps = set()
    for code in out.split():
        digits = code.removeprefix("sm_")
        if code.startswith("sm_") and digits.isdigit() and len(digits) >= 2:
            caps.add(f"{digits[:-1]}.{digits[-1]}")
    return caps or None


def cuda_arch_list(capabilities: list[str], supported: set[str] | None = None) -> str:
    """TORCH_CUDA_ARCH_LIST for a local CUDA build: build.toml's capabilities that the compiler supports
    (kernel-builder likewise builds the intersection with each toolkit's capabilities). When the entry that carries
    "+PTX" is not supported (e.g. 12.0 with CUDA < 12.8), the highest supported one carries it instead, so newer GPUs
    still get code they can JIT-compile. supported=None keeps the whole list."""
    entries = [(c.removesuffix("+PTX"), c.endswith("+PTX")) for c in capabilities]
    kept = [(cap, ptx) for cap, ptx in entries if supported is None or cap in supported]
    if not kept:
        raise KernelBuildError(
            f"the CUDA compiler supports none of build.toml's capabilities {capabilities} "
            f"(it supports {sorted(supported or ())}); set TORCH_CUDA_ARCH_LIST"
        )
    if any(ptx for _, ptx in entries) and not any(ptx for _, ptx in kept):
        kept[-1] = (kept[-1][0], True)
    return ";".join(cap + ("+PTX" if ptx else "") for cap, ptx in kept)


def _torch_uses_openmp() -> bool:
    import torch

    return sys.platform.startswith("linux") and "parallel backend: OpenMP" in torch.__config__.parallel_info()


def host_flags(src: Path | None = None, cuda: bool = False) -> tuple[list[str], list[str]]:
    """Host compiler and linker flags of the local build: the `cxx-flags` of build.toml's CPU (or CUDA) kernel, plus
    -O3 and -DDCNV3_LOCAL_BUILD.

    With torch's OpenMP backend (its Linux CPU wheels), at::parallel_for is inline code compiled into the extension:
    without -fopenmp it becomes a serial loop and the kernel silently runs on one thread. The library then needs
    libgomp.so.1, which resolves to the copy torch has already loaded, hence -fopenmp for the linker too. (torch's
    native backend needs no flag; Apple clang has no plain -fopenmp, so other platforms drop it.)
    """
    shared = _string_list(_kernel_section(build_config(src), cuda), "cxx-flags")
    openmp = _torch_uses_openmp()
    cflags = ["-O3", "-DDCNV3_LOCAL_BUILD"] + [f for f in shared if f != "-fopenmp" or openmp]
    ldflags = ["-fopenmp"] if openmp and "-fopenmp" in shared else []
    return cflags, ldflags


def nvcc_flags(src: Path | None = None) -> list[str]:
    """nvcc flags of a local CUDA build: build.toml's `cuda-flags` plus -O3 and the two local defines (torch adds
    its own common nvcc flags and one -gencode per TORCH_CUDA_ARCH_LIST entry)."""
    shared = _string_list(_kernel_section(build_config(src), True), "cuda-flags")
    return ["-O3", "-DDCNV3_LOCAL_BUILD", "-DDCNV3_WITH_CUDA", *shared]


def source_digest(src: Path | None = None) -> str:
    """SHA-256 over the kernel sources (paths and contents, build.toml included) and the host build flags: a build is
    current when its digest matches."""
    src = _require_src(src)
    h = hashlib.sha256()
    cflags, ldflags = host_flags(src)
    h.update(" ".join(cflags + ldflags).encode() + b"\0")
    for path in _source_files(src):
        h.update(path.relative_to(src).as_posix().encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def torch_variant(cuda: bool | None = None) -> str:
    """`kernels` build-variant name for the running torch (compiled variants must match its minor version)."""
    import torch

    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    abi = "cxx11" if getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True) else "cxx98"
    if cuda is None:
        cuda = torch.version.cuda is not None
    if cuda:
        if torch.version.cuda is None:
            raise KernelBuildError("a CUDA build needs a CUDA build of torch; this torch is CPU-only")
        cu_major, cu_minor = torch.version.cuda.split(".")[:2]
        backend = f"cu{cu_major}{cu_minor}"
    else:
        backend = "cpu"
    machine = platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    system = {"linux": "linux", "darwin": "darwin", "win32": "windows"}.get(sys.platform, sys.platform)
    return f"torch{major}{minor}-{abi}-{backend}-{machine}-{system}"


def variant_dir(cache_dir: str | os.PathLike | None = None, cuda: bool | None = None) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "build" / torch_variant(cuda)


def _cuda_wanted(cuda: bool | None) -> bool:
    import torch

    if cuda is not None:
        if cuda and torch.version.cuda is None:
            raise KernelBuildError(
                "--cuda needs a CUDA build of torch (this torch is CPU-only: "
                f"{torch.__version__}); install one from https://pytorch.org"
            )
        return bool(cuda)
    if torch.version.cuda is None:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None


@contextmanager
def _build_lock(root: Path):
    """Serialise builds into the same cache folder (best effort on systems without fcntl)."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(root / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# Runs in a child process: compile with torch's cpp_extension (ninja) and report the library path.
_COMPILE_SCRIPT = r"""
import json, sys
cfg = json.loads(sys.argv[1])
from torch.utils.cpp_extension import load
load(name=cfg["name"], sources=cfg["sources"], extra_cflags=cfg["cflags"], extra_cuda_cflags=cfg["cuda_cflags"],
     extra_ldflags=cfg["ldflags"], extra_include_paths=cfg["include"], build_directory=cfg["build_dir"],
     verbose=cfg["verbose"], with_cuda=cfg["with_cuda"], is_python_module=True)
"""

# Runs in a child process: import the staged package the way the loader does and run the op once.
_SMOKE_SCRIPT = r"""
import sys
import torch
path = sys.argv[1]
from pathlib import Path
from internimage_hf.ops.loader import _import_variant
mod = _import_variant(Path(path)).module  # validated names, verified files, namespaced module name
x = torch.randn(2, 5, 6, 8, dtype=torch.float64, requires_grad=True)
off = torch.randn(2, 5, 6, 2 * 9 * 2, dtype=torch.float64, requires_grad=True)
m = torch.rand(2, 5, 6, 2 * 9, dtype=torch.float64, requires_grad=True)
y = mod.dcnv3_core(x, off, m, 3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0, 0)
y.square().sum().backward()
assert y.shape == x.shape and bool(torch.isfinite(y).all()) and x.grad is not None
om = torch.randn(2, 5, 6, 56, dtype=torch.float64, requires_grad=True)  # DCNv4: G * 3P = 54, padded to 56
z = mod.dcnv4_core(x, om, 3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0, 0)
z.square().sum().backward()
assert z.shape == x.shape and bool(torch.isfinite(z).all()) and om.grad is not None
print("ok", ",".join(mod.backends()))
"""


def _run(
    cmd: list[str],
    verbose: bool,
    what: str,
    log: Path,
    extra_env: dict[str, str] | None = None,
    tick: Callable[[float], None] | None = None,
    tick_seconds: float = 1.0,
) -> str:
    """Run a child process; `tick(elapsed seconds)` is called about every `tick_seconds` while it runs."""
    env = dict(os.environ)
    env.setdefault("MAX_JOBS", str(max(1, os.cpu_count() or 1)))
    env.update(extra_env or {})
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdout=None if verbose else subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        while True:
            try:
                out, _ = proc.communicate(timeout=tick_seconds if tick else None)
                break
            except subprocess.TimeoutExpired:  # retrying communicate() loses no output
                tick(time.monotonic() - start)
    except BaseException:  # Ctrl-C, or a progress callback that gives up: no orphaned compiler
        proc.kill()
        proc.wait()
        raise
    out = out or ""
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ {what}\n{out}\n")
    if proc.returncode != 0:
        tail = "\n".join(out.strip().splitlines()[-40:])
        raise KernelBuildError(f"{what} failed (exit {proc.returncode}); full log: {log}\n{tail}")
    return out


def _write_package(src: Path, dest: Path, ext_name: str, meta: dict) -> None:
    dest.mkdir(parents=True)
    for py in sorted((src / PACKAGE_DIR).glob("*.py")):
        shutil.copy2(py, dest / py.name)
    (dest / "_ops.py").write_text(
        '"""Op namespace of this build (what kernel-builder generates for Hub builds)."""\n\n'
        "import torch\n\n"
        f"from . import {ext_name}  # noqa: F401  (loading it registers the ops)\n\n"
        f"ops = torch.ops.{ext_name}\n\n\n"
        "def add_op_namespace_prefix(op_name: str) -> str:\n"
        f'    return "{ext_name}::" + op_name\n',
        encoding="utf-8",
    )
    (dest / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _record_files(package: Path, meta: dict) -> None:
    """Record the size and SHA-256 of every file of the package (the library included) in its metadata.json: the
    loader checks them before importing anything (a truncated library would crash the process on first use)."""

    meta["internimage_hf"]["files"] = {
        p.name: file_record(p) for p in sorted(package.iterdir()) if p.is_file() and p.name != "metadata.json"
    }
    (package / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def build_kernels(
    cache_dir: str | os.PathLike | None = None,
    cuda: bool | None = None,
    verbose: bool = False,
    force: bool = False,
    progress: Callable[[str, float], None] | None = None,
) -> Path:
    """Compile the DCNv3 kernels into the cache; returns the variant folder (`<cache>/build/<variant>`).

    cuda: None = build the CUDA kernel too when torch is a CUDA build and nvcc is found; True = require it;
    False = CPU only. The arch list comes from $TORCH_CUDA_ARCH_LIST, by default from build.toml's cuda-capabilities
    (those the CUDA compiler supports, see `cuda_arch_list`).
    An up-to-date build (same sources, torch and backends) is kept unless force=True.
    `progress(step, seconds)` is told what happens: "reuse" (an up-to-date build is kept; nothing else follows), or
    "compile" (first at 0 s, then about every second while the compiler runs), "smoke-test", "install".
    Raises KernelBuildError with the compiler's output when the build fails.
    """
    report = progress or (lambda step, seconds=0.0: None)
    import torch

    src = source_dir()
    if src is None:
        raise KernelBuildError(
            "DCNv3 kernel sources (csrc/) not found: reinstall internimage-hf or build from a source checkout"
        )
    with_cuda = _cuda_wanted(cuda)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    variant = torch_variant(with_cuda)
    final = root / "build" / variant
    digest = source_digest(src)
    backends = ["cpu", "cuda"] if with_cuda else ["cpu"]

    with _build_lock(root):
        if not force and final.is_dir():
            try:
                record = read_metadata(final).get("internimage_hf", {})

                _, record = build_record(final)
                verify_build(final, record)  # every file as the build wrote it (else: rebuild)
                if (
                    record.get("source_digest") == digest
                    and record.get("torch") == torch.__version__
                    and record.get("backends") == backends
                ):
                    report("reuse", 0.0)
                    return final
            except Exception:  # unreadable or foreign folder: rebuild it
                pass

        tag = uuid.uuid4().hex[:8]
        ext_name = f"_{PACKAGE_NAME}_{digest[:10]}_{tag}"
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{variant}-", dir=root))
        log = root / "last-build.log"
        log.write_text(f"internimage_hf DCNv3 kernel build, {_dt.datetime.now().isoformat()}\n", encoding="utf-8")
        try:
            obj_dir = staging / "obj"
            obj_dir.mkdir()
            config = build_config(src)
            cflags, ldflags = host_flags(src, cuda=with_cuda)
            cuda_cflags: list[str] = []
            sources = [str(src / s) for s in build_sources(src, cuda=with_cuda)]
            archs = ""
            if with_cuda:
                archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or cuda_arch_list(
                    cuda_capabilities(src), nvcc_capabilities()
                )
                cflags.append("-DDCNV3_WITH_CUDA")
                cuda_cflags = nvcc_flags(src)
            cfg = {
                "name": ext_name,
                "sources": sources,
                "cflags": cflags,
                "ldflags": ldflags,
                "cuda_cflags": cuda_cflags,
                "include": [str(src), str(src / "torch-ext")],
                "build_dir": str(obj_dir),
                "verbose": verbose,
                "with_cuda": with_cuda,
            }
            report("compile", 0.0)
            _run(
                [sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(cfg)],
                verbose,
                "compile",
                log,
                {"TORCH_CUDA_ARCH_LIST": archs} if with_cuda else None,
                tick=(lambda seconds: report("compile", seconds)) if progress else None,
            )
            libs = [p for p in obj_dir.iterdir() if p.name.startswith(ext_name) and p.suffix in {".so", ".pyd"}]
            if not libs:
                raise KernelBuildError(f"the compiler produced no library in {obj_dir}; full log: {log}")

            meta = {
                "id": ext_name.lstrip("_"),
                "name": config["general"]["name"],
                "version": config["general"]["version"],
                "license": config["general"]["license"],
                "python-depends": [],
                "backend": ({"type": "cuda", "archs": archs.split(";")} if with_cuda else {"type": "cpu"}),
                "internimage_hf": {
                    "source_digest": digest,
                    "ext_name": ext_name,
                    "torch": torch.__version__,
                    "cuda": torch.version.cuda if with_cuda else None,
                    "backends": backends,
                    "built": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                },
            }
            package = staging / variant
            _write_package(src, package, ext_name, meta)
            shutil.copy2(libs[0], package / libs[0].name)
            _record_files(package, meta)
            report("smoke-test", 0.0)
            _run([sys.executable, "-c", _SMOKE_SCRIPT, str(package)], False, "smoke test", log)
            report("install", 0.0)

            final.parent.mkdir(parents=True, exist_ok=True)
            old = None
            if final.exists():
                old = root / f".old-{variant}-{tag}"
                os.rename(final, old)
            os.rename(package, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final


__all__ = [
    "KernelBuildError",
    "build_config",
    "build_kernels",
    "build_sources",
    "cuda_arch_list",
    "cuda_capabilities",
    "nvcc_capabilities",
    "default_cache_dir",
    "source_dir",
    "source_digest",
    "torch_variant",
    "variant_dir",
    "read_metadata",
]
