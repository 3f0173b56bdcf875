"""The kernel-builder tree in csrc/: build.toml in the current format, the layer `kernels.kernelize` loads, and one
list of sources, capabilities and flags shared with the local builder.

kernel-builder itself is a Nix tool and is not installed here. Its build.toml parser is: the Rust code of
huggingface/kernels (kernels-common, `config/parse.rs` and the edition structs) ships inside the `kernels` Python
package as `kernels._rust.Build.open`, the same parser kernel-builder runs before it generates its CMake files. The
tests run it when it is there, and also check the file against the schema written out below (edition 6, taken from
that code: kernels-common/src/config/v6.rs and kernel-builder/src/pyproject/kernel.rs in huggingface/kernels, and
the messages of the parser in `kernels` 0.19.1), plus what the parser does not check: that every listed file exists,
that the torch-ext package is named after the kernel, that the CUDA capabilities cover sm_75 to sm_120.
"""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from internimage_hf.ops import build

CSRC = Path(__file__).resolve().parents[1] / "csrc"
BUILD_TOML = CSRC / "build.toml"

# ------------------------------------------------------------------------------------ build.toml schema, edition 6
CURRENT_EDITION = 6
BACKENDS = {"cann", "cpu", "cuda", "metal", "neuron", "rocm", "tpu", "xpu"}
TOP_LEVEL = {"general", "torch", "torch-noarch", "tvm-ffi", "kernel"}
FRAMEWORKS = {"torch", "torch-noarch", "tvm-ffi"}
GENERAL_REQUIRED = {"name", "version", "edition", "license", "backends"}
GENERAL_OPTIONAL = {
    "upstream",
    "source",
    "build-layout",
    "cuda",
    "hub",
    "kernel-depends",
    "neuron",
    "python-depends",
    "tpu",
    "xpu",
}
HUB_KEYS = {"repo-id", "branch"}
TORCH_KEYS = {"include", "minver", "maxver", "pyext", "src", "stable-abi", "cxx-flags"}
# Edition 6 tags a kernel by its language (which names the backend); each language has its own keys.
LANGUAGE_BACKEND = {
    "cpp-cpu": "cpu",
    "rust-cpu": "cpu",
    "cpp-cuda": "cuda",
    "rust-cuda-oxide": "cuda",
    "rust-cutile": "cuda",
    "cpp-metal": "metal",
    "cpp-rocm": "rocm",
    "cpp-xpu": "xpu",
}
KERNEL_KEYS = {  # the C++ languages (the only ones with `src`); required: language, depends, src
    "cpp-cpu": {"cxx-flags", "depends", "include", "src"},
    "cpp-cuda": {"cuda-capabilities", "cuda-flags", "cuda-minver", "cxx-flags", "depends", "include", "src"},
    "cpp-metal": {"cxx-flags", "depends", "include", "src"},
    "cpp-rocm": {"cxx-flags", "depends", "rocm-archs", "hip-flags", "include", "src"},
    "cpp-xpu": {"cxx-flags", "depends", "sycl-flags", "include", "src"},
}
DEPENDS = {
    "torch",
    "torch-stable-abi-shim",
    "cutlass_2_10",
    "cutlass_3_5",
    "cutlass_3_6",
    "cutlass_3_8",
    "cutlass_3_9",
    "cutlass_4_0",
    "cutlass_4_4",
    "cutlass_4_5",
    "sycl_tla",
    "metal-cpp",
}
KERNEL_NAME_RE = re.compile(r"^[a-z][-a-z0-9]*[a-z0-9]$")
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][-A-Za-z0-9_.]*/[A-Za-z0-9][-A-Za-z0-9_.]*$")
CAPABILITY_RE = re.compile(r"^(\d+)\.(\d)([af]?)(\+PTX)?$")
# Real GPUs the CUDA kernel must run on: Turing to Blackwell (T4, A100, A10/RTX 30xx, Jetson Orin, L4/RTX 40xx,
# H100, B200, B300, RTX 50xx, GB10).
REQUIRED_GPUS = ("7.5", "8.0", "8.6", "8.7", "8.9", "9.0", "10.0", "10.3", "12.0", "12.1")


def _version(cap: str) -> tuple[int, int]:
    major, minor = cap.split(".")
    return int(major), int(minor)


def _str_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


def schema_errors(config: dict, root: Path | None = None) -> list[str]:
    """What is wrong with a parsed build.toml, against the edition-6 schema (empty: valid). With `root`, listed files
    and include folders must exist under it."""
    errors: list[str] = []
    unknown = set(config) - TOP_LEVEL
    if unknown:
        errors.append(f"unknown top-level tables {sorted(unknown)}")
    general = config.get("general")
    if not isinstance(general, dict):
        return [*errors, "missing [general]"]
    missing = GENERAL_REQUIRED - set(general)
    if missing:
        errors.append(f"[general] lacks {sorted(missing)}")
    if "edition" not in general:
        errors.append("no general.edition: kernel-builder reads this as a legacy file (`kernel-builder update-build`)")
    elif general["edition"] != CURRENT_EDITION:
        errors.append(f"general.edition = {general['edition']!r}, the current edition is {CURRENT_EDITION}")
    if set(general) - GENERAL_REQUIRED - GENERAL_OPTIONAL:
        errors.append(f"unknown [general] keys {sorted(set(general) - GENERAL_REQUIRED - GENERAL_OPTIONAL)}")
    name = general.get("name")
    if not (isinstance(name, str) and KERNEL_NAME_RE.match(name)):
        errors.append(f"general.name {name!r} must match {KERNEL_NAME_RE.pattern}")
    version = general.get("version")
    if not (isinstance(version, int) and not isinstance(version, bool) and version >= 1):
        errors.append(f"general.version must be a positive integer, got {version!r}")
    if not (isinstance(general.get("license"), str) and general["license"].strip()):
        errors.append("general.license must be a Hub license identifier")
    backends = general.get("backends")
    if not (_str_list(backends) and backends and set(backends) <= BACKENDS and len(set(backends)) == len(backends)):
        errors.append(f"general.backends must be distinct values of {sorted(BACKENDS)}, got {backends!r}")
        backends = []
    hub = general.get("hub", {})
    if not isinstance(hub, dict) or set(hub) - HUB_KEYS:
        errors.append(f"[general.hub] allows only {sorted(HUB_KEYS)}")
    elif "repo-id" in hub and not (isinstance(hub["repo-id"], str) and REPO_ID_RE.match(hub["repo-id"])):
        errors.append(f"general.hub.repo-id {hub['repo-id']!r} is not an owner/name Hub repository id")

    frameworks = FRAMEWORKS & set(config)
    if len(frameworks) != 1:
        errors.append(f"exactly one of {sorted(FRAMEWORKS)} is needed, got {sorted(frameworks)}")
    torch_section = config.get("torch")
    if torch_section is not None:
        if set(torch_section) - TORCH_KEYS:
            errors.append(f"unknown [torch] keys {sorted(set(torch_section) - TORCH_KEYS)}")
        if not _str_list(torch_section.get("src")):
            errors.append("[torch] needs `src`, a list of files")
        else:
            errors += _file_errors("[torch]", torch_section["src"], root)

    kernels = config.get("kernel", {})
    kernel_backends = set()
    for kname, kernel in kernels.items():
        where = f"[kernel.{kname}]"
        if "backend" in kernel:
            errors.append(f"{where}: `backend` is the edition-5 key; edition 6 names the `language` (e.g. cpp-cuda)")
        language = kernel.get("language")
        if language not in LANGUAGE_BACKEND:
            errors.append(f"{where}: language {language!r} is not one of {sorted(LANGUAGE_BACKEND)}")
            continue
        kernel_backends.add(LANGUAGE_BACKEND[language])
        allowed = KERNEL_KEYS.get(language)
        if allowed is None:
            continue  # Rust kernels: not used here
        extra = set(kernel) - allowed - {"language", "backend"}
        if extra:
            errors.append(f"{where}: unknown keys {sorted(extra)} for {language}")
        for key in ("depends", "src"):
            if key not in kernel:
                errors.append(f"{where}: `{key}` is required")
        if not (_str_list(kernel.get("depends", [])) and set(kernel.get("depends", [])) <= DEPENDS):
            errors.append(f"{where}: depends {kernel.get('depends')!r} must be among {sorted(DEPENDS)}")
        for key in ("src", "include", "cxx-flags", "cuda-flags", "cuda-capabilities"):
            if key in kernel and not _str_list(kernel[key]):
                errors.append(f"{where}: `{key}` must be a list of non-empty strings")
        if _str_list(kernel.get("src")):
            errors += _file_errors(where, kernel["src"], root)
        if root is not None and _str_list(kernel.get("include", [])):
            errors += [
                f"{where}: include {i!r} is not a folder"
                for i in kernel.get("include", [])
                if not _inside(root, i).is_dir()
            ]
        if _str_list(kernel.get("cuda-capabilities")):
            errors += [f"{where}: {e}" for e in capability_errors(kernel["cuda-capabilities"])]
    if backends and kernels and kernel_backends != set(backends):
        errors.append(f"general.backends {sorted(backends)} but the kernels build for {sorted(kernel_backends)}")
    return errors


def _inside(root: Path, rel: str) -> Path:
    path = (root / rel).resolve()
    if path != root.resolve() and root.resolve() not in path.parents:
        raise AssertionError(f"{rel!r} points outside {root}")
    return path


def _file_errors(where: str, files: list[str], root: Path | None) -> list[str]:
    errors = [f"{where}: {f!r} is listed twice" for f in set(files) if files.count(f) > 1]
    if root is not None:
        errors += [
            f"{where}: {f!r} does not exist" for f in files if Path(f).is_absolute() or not _inside(root, f).is_file()
        ]
    return errors


def capability_errors(caps: list[str]) -> list[str]:
    """Form of a cuda-capabilities list: `<major>.<minor>[a|f][+PTX]`, ascending, without duplicates, +PTX (what
    kernel-builder's CMake turns into a compute_XY code) only on the highest entry."""
    errors = [f"capability {c!r} is not <major>.<minor>[a|f][+PTX]" for c in caps if not CAPABILITY_RE.match(c)]
    if errors:
        return errors
    bases = [c.removesuffix("+PTX") for c in caps]
    if len(set(bases)) != len(bases):
        errors.append(f"duplicate capabilities in {caps}")
    plain = [_version(re.sub(r"[af]$", "", b)) for b in bases]
    if plain != sorted(plain):
        errors.append(f"capabilities {caps} are not in ascending order")
    ptx = [c for c in caps if c.endswith("+PTX")]
    if ptx and ptx != [caps[-1]]:
        errors.append(f"+PTX belongs on the highest capability only, got {ptx}")
    return errors


def runs_on(caps: list[str], gpu: str) -> bool:
    """Whether a build with these capabilities has code for a GPU of capability `gpu`: SASS of the same major version
    and a minor version <= the GPU's (cubins run forward within a major version, the rule of kernel-builder's
    cuda_archs_loose_intersection), or PTX of a version <= the GPU's (the driver JIT-compiles it forward)."""
    target = _version(gpu)
    for cap in caps:
        if re.search(r"[af](\+PTX)?$", cap):
            continue  # arch-specific code runs on that exact GPU only
        base = _version(cap.removesuffix("+PTX"))
        if base <= target and (base[0] == target[0] or cap.endswith("+PTX")):
            return True
    return False


@pytest.fixture(scope="module")
def config() -> dict:
    with open(BUILD_TOML, "rb") as f:
        return tomllib.load(f)


def test_build_toml_matches_the_edition_6_schema(config):
    assert schema_errors(config, CSRC) == []


def test_kernels_build_toml_parser_accepts_it_without_an_upgrade():
    """kernel-builder's own parser (in the `kernels` package): the file parses as the current edition, with no
    "upgrading ... in memory" notice (which it prints, to stderr, for edition 5 and the v4 format)."""
    rust = pytest.importorskip("kernels._rust")
    if not hasattr(rust, "Build"):
        pytest.skip("this kernels version has no build.toml parser")
    code = (
        "import sys, kernels._rust as r\n"
        f"b = r.Build.open({str(CSRC)!r})\n"
        "print(sorted(str(x).lower() for x in b.general.backends))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "upgrad" not in proc.stderr.lower() and "legacy" not in proc.stderr.lower(), proc.stderr
    assert proc.stdout.strip() == "['cpu', 'cuda']"


def _mutations(config: dict):
    """Damaged copies of build.toml, each of which kernel-builder refuses."""
    import copy

    def legacy(c):  # the file before the upgrade: no edition/license, kernels tagged by backend
        del c["general"]["edition"], c["general"]["license"]
        for k in c["kernel"].values():
            k["backend"] = k.pop("language").removeprefix("cpp-")

    def no_license(c):
        del c["general"]["license"]

    def unknown_general_key(c):
        c["general"]["capabilities"] = ["8.0"]

    def unknown_language(c):
        c["kernel"]["dcnv3_cuda"]["language"] = "cuda"

    def unknown_kernel_key(c):
        c["kernel"]["dcnv3_cpu"]["cuda-capabilities"] = ["8.0"]

    def unknown_dependency(c):
        c["kernel"]["dcnv3_cpu"]["depends"] = ["torch", "openmp"]

    def bad_name(c):
        c["general"]["name"] = "internimage_dcnv3"

    for fn in (
        legacy,
        no_license,
        unknown_general_key,
        unknown_language,
        unknown_kernel_key,
        unknown_dependency,
        bad_name,
    ):
        damaged = copy.deepcopy(config)
        fn(damaged)
        yield fn.__name__, damaged


def _dump_toml(config: dict) -> str:
    tomlkit = pytest.importorskip("tomlkit")
    return tomlkit.dumps(config)


def test_schema_and_the_kernels_parser_refuse_the_same_damaged_files(config, tmp_path):
    rust = pytest.importorskip("kernels._rust")
    for name, damaged in _mutations(config):
        assert schema_errors(damaged), f"the schema accepts {name}"
        if not hasattr(rust, "Build"):
            continue
        (tmp_path / "build.toml").write_text(_dump_toml(damaged), encoding="utf-8")
        with pytest.raises(ValueError):
            rust.Build.open(tmp_path)


def test_schema_rejects_edition_5_that_kernels_only_upgrades_in_memory(config):
    import copy

    old = copy.deepcopy(config)
    old["general"]["edition"] = 5
    for kernel in old["kernel"].values():
        kernel["backend"] = kernel.pop("language").removeprefix("cpp-")
    errors = schema_errors(old)
    assert any("edition" in e for e in errors) and any("`backend` is the edition-5 key" in e for e in errors)


def test_every_kernel_source_is_listed_and_the_cpu_kernel_has_no_cuda_code(config):
    """kernel-builder copies only what build.toml lists: a header added to csrc/ but not listed would break the Hub
    build and nothing local would notice."""
    on_disk = {
        p.relative_to(CSRC).as_posix()
        for d in ("dcnv3_common", "dcnv3_cpu", "dcnv3_cuda")
        for p in (CSRC / d).rglob("*")
        if p.is_file() and p.suffix in {".h", ".cuh", ".cpp", ".cc", ".cu"}
    }
    cpu = set(config["kernel"]["dcnv3_cpu"]["src"])
    cuda = set(config["kernel"]["dcnv3_cuda"]["src"])
    assert cuda == on_disk
    assert cpu == {f for f in on_disk if not f.startswith("dcnv3_cuda/")}
    torch_ext = {p.name for p in (CSRC / "torch-ext").glob("torch_binding.*")}
    assert {Path(f).name for f in config["torch"]["src"]} == torch_ext


def test_python_package_is_named_after_the_kernel(config):
    name = config["general"]["name"]
    python_name = name.replace("-", "_")
    rust = pytest.importorskip("kernels._rust")
    if hasattr(rust, "KernelName"):
        assert rust.KernelName(name).python_name == python_name
    assert (CSRC / "torch-ext" / python_name / "__init__.py").is_file()
    assert (CSRC / "torch-ext" / python_name / "layers.py").is_file()
    assert (name, python_name) == (build.KERNEL_NAME, build.PACKAGE_NAME)


def test_hub_repo_id_and_license(config):
    assert REPO_ID_RE.match(config["general"]["hub"]["repo-id"])
    assert config["general"]["hub"]["repo-id"].endswith("/" + config["general"]["name"])
    license_text = (CSRC.parent / "LICENSE").read_text(encoding="utf-8")
    assert config["general"]["license"] == "mit" and license_text.startswith("MIT License")


# ----------------------------------------------------------------------------------------------- CUDA capabilities
def test_cuda_capabilities_cover_turing_to_blackwell(config):
    caps = config["kernel"]["dcnv3_cuda"]["cuda-capabilities"]
    assert capability_errors(caps) == []
    missing = [gpu for gpu in REQUIRED_GPUS if not runs_on(caps, gpu)]
    assert missing == [], f"no code for compute capability {missing} in {caps}"
    assert caps[-1].endswith("+PTX") and runs_on(caps, "13.0"), "later GPUs need PTX"


@pytest.mark.parametrize(
    ("caps", "gpu", "expected"),
    [
        (["8.0", "9.0"], "8.9", True),  # sm_80 SASS runs on 8.9
        (["8.0", "9.0"], "7.5", False),
        (["8.0", "9.0"], "12.0", False),  # no PTX: Blackwell gets nothing (the bug this tree had)
        (["8.0", "9.0+PTX"], "12.0", True),
        (["9.0a"], "9.0", False),
        (["7.5", "12.0+PTX"], "10.0", False),  # PTX only runs forward
    ],
)
def test_runs_on_rule(caps, gpu, expected):
    assert runs_on(caps, gpu) is expected


def test_capabilities_are_ones_nvcc_and_torch_know():
    caps = build.cuda_capabilities()
    from torch.utils import cpp_extension

    try:  # torch validates TORCH_CUDA_ARCH_LIST against a list inside this private function
        src = inspect.getsource(cpp_extension._get_cuda_arch_flags)
    except (AttributeError, OSError, TypeError):
        src = ""
    if "supported_arches" in src:
        for cap in caps:
            assert f"'{cap.removesuffix('+PTX')}'" in src, f"torch's cpp_extension does not know {cap}"
    supported = build.nvcc_capabilities()
    if supported is None:
        pytest.skip("no nvcc here")
    # nvcc 13 still has sm_75 and already has sm_120; older toolkits lose the newest ones (cuda_arch_list drops them)
    if {"7.5", "12.0"} <= supported:
        assert {c.removesuffix("+PTX") for c in caps} <= supported


# ------------------------------------------------------------------------ one list for build.toml and the local build
def test_local_build_reads_sources_flags_and_capabilities_from_build_toml(config):
    torch_src = config["torch"]["src"]
    for cuda, section in ((False, "dcnv3_cpu"), (True, "dcnv3_cuda")):
        kernel = config["kernel"][section]
        listed = [s for s in torch_src + kernel["src"] if s.endswith((".cpp", ".cu"))]
        assert build.build_sources(cuda=cuda) == listed
        cflags, ldflags = build.host_flags(cuda=cuda)
        expected = [f for f in kernel["cxx-flags"] if f != "-fopenmp" or "-fopenmp" in ldflags]
        assert [f for f in cflags if f in kernel["cxx-flags"]] == expected
        assert set(cflags) - set(kernel["cxx-flags"]) == {"-O3", "-DDCNV3_LOCAL_BUILD"}
    assert build.cuda_capabilities() == config["kernel"]["dcnv3_cuda"]["cuda-capabilities"]
    nvcc = build.nvcc_flags()
    assert nvcc[-len(config["kernel"]["dcnv3_cuda"]["cuda-flags"]) :] == config["kernel"]["dcnv3_cuda"]["cuda-flags"]
    assert build.cuda_arch_list(build.cuda_capabilities()) == ";".join(build.cuda_capabilities())


def test_build_py_hardcodes_no_capabilities_or_shared_flags():
    """Every string in build.py's code (docstrings aside): no capability, no arch list, no flag build.toml owns."""
    tree = ast.parse(inspect.getsource(build))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.FunctionDef | ast.ClassDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    strings = [
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
    ]
    assert strings, "build.py has no string constants?"
    for value in strings:
        assert not any(CAPABILITY_RE.match(part) for part in value.split(";")), f"arch literal {value!r} in build.py"
        assert value not in {"-fno-math-errno", "-lineinfo"}, f"flag {value!r} belongs in build.toml"


@pytest.mark.parametrize(
    ("supported", "expected"),
    [
        (None, "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"),
        ({"7.5", "8.0", "8.6", "8.7", "8.9", "9.0", "10.0", "12.0", "12.1"}, "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"),
        ({"5.0", "7.5", "8.0", "8.6", "8.9", "9.0"}, "7.5;8.0;8.6;8.9;9.0+PTX"),  # CUDA 12.6: PTX moves down
    ],
)
def test_cuda_arch_list_intersects_with_the_compiler(supported, expected):
    caps = ["7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0+PTX"]
    assert build.cuda_arch_list(caps, supported) == expected


def test_cuda_arch_list_with_nothing_supported_names_the_lists():
    with pytest.raises(build.KernelBuildError, match="TORCH_CUDA_ARCH_LIST"):
        build.cuda_arch_list(["12.0+PTX"], {"7.5"})


def test_nvcc_capabilities_parses_list_gpu_code(tmp_path):
    fake = tmp_path / "nvcc"
    fake.write_text("#!/bin/sh\nprintf 'sm_75\\nsm_80\\nsm_90a\\nsm_100\\nsm_120\\n'\n", encoding="utf-8")
    fake.chmod(0o755)
    assert build.nvcc_capabilities(fake) == {"7.5", "8.0", "10.0", "12.0"}
    assert build.nvcc_capabilities(tmp_path / "missing") is None


def test_local_build_metadata_comes_from_build_toml(config, kernel_dir):
    meta = build.read_metadata(kernel_dir)
    general = config["general"]
    assert (meta["name"], meta["version"], meta["license"]) == (general["name"], general["version"], general["license"])
    rust = pytest.importorskip("kernels._rust")
    if hasattr(rust, "Metadata"):
        parsed = rust.Metadata.read_from_file(kernel_dir / "metadata.json")
        assert str(parsed.name) == general["name"] and parsed.version == general["version"]


# ------------------------------------------------------------------------------------------------------ the layer
LAYERS_PY = CSRC / "torch-ext" / build.PACKAGE_NAME / "layers.py"


@pytest.mark.parametrize("name", ["DCNv3Core", "DCNv4Core"])
def test_layers_py_defines_a_stateless_layer_without_importing_it(name):
    """What kernels' `_validate_layer` demands, read from the source: an nn.Module subclass with no `__init__` and no
    members besides `forward`, `has_backward` and `can_torch_compile` (both True: the op has an autograd formula
    and a fake implementation)."""
    tree = ast.parse(LAYERS_PY.read_text(encoding="utf-8"))
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef)]
    assert [c.name for c in classes] == ["DCNv3Core", "DCNv4Core"]
    cls = next(c for c in classes if c.name == name)
    assert [ast.unparse(b) for b in cls.bases] == ["nn.Module"]
    members = {}
    for node in cls.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # docstring
        if isinstance(node, ast.Assign):
            (target,) = node.targets
            members[target.id] = ast.literal_eval(node.value)
        elif isinstance(node, ast.FunctionDef):
            members[node.name] = "function"
        else:
            raise AssertionError(f"unexpected statement in {name}: {ast.unparse(node)}")
    assert members == {"has_backward": True, "can_torch_compile": True, "forward": "function"}
    forward = next(n for n in cls.body if isinstance(n, ast.FunctionDef))
    import internimage_hf.ops

    ours = getattr(internimage_hf.ops, name)
    assert [a.arg for a in forward.args.args] == list(inspect.signature(ours.forward).parameters)


@pytest.mark.parametrize("name", ["DCNv3Core", "DCNv4Core"])
def test_kernels_validates_the_built_layer_against_the_models_layer(kernel, name):
    """kernels' own check, as `kernelize` runs it on the layer it loads (private API; skipped if it moved)."""
    try:
        from kernels._internals.layer.layer import _validate_layer
    except ImportError:
        pytest.skip("kernels' layer validation is not where this test expects it")
    import internimage_hf.ops
    from internimage_hf.ops import hub

    built = getattr(kernel.layers, name)
    _validate_layer(check_cls=getattr(internimage_hf.ops, name), cls=built, repo="local build")
    assert built.has_backward is True and built.can_torch_compile is True
    # ... and the reference layer hub.py falls back to, whose forward takes *args with the layer's signature
    _validate_layer(check_cls=getattr(internimage_hf.ops, name), cls=hub.REFERENCE_LAYERS[name], repo="reference")


# ------------------------------------------------------------------------------------------------ the entry points
@pytest.mark.parametrize(("path", "device"), [("dcnv3_cpu/dcnv3_cpu.cpp", "cpu"), ("dcnv3_cuda/dcnv3_cuda.cu", "cuda")])
@pytest.mark.parametrize(
    ("version", "check", "grad_check"),
    [
        ("dcnv3", "check_args(input_, offset_, mask_,", "check_grad_output(grad_output_, input_, s);"),
        ("dcnv4", "check_args_v4(input_, offset_mask_,", 'check_grad_output(grad_output_, input_, s, "DCNv4");'),
    ],
)
def test_cpu_and_cuda_entry_points_share_their_argument_checks(path, device, version, check, grad_check):
    """Both backends validate arguments with the same code (dcnv3_common/dcnv3_args.h), first thing in each entry
    point, so a call the CPU op refuses is refused by the CUDA op too (CUDA is only compile-checked here)."""
    text = (CSRC / path).read_text(encoding="utf-8")
    assert '#include "dcnv3_common/dcnv3_args.h"' in text
    for op in ("forward", "backward"):
        match = re.search(rf"^\S.*\b{version}_{op}_{device}\([^{{]*\{{\n(.*?)^\}}", text, re.S | re.M)
        assert match, f"{version}_{op}_{device} not found in {path}"
        statements = [line.strip() for line in match.group(1).splitlines() if line.strip()]
        assert statements[0].startswith(f"const Shape s = {check}"), statements[0]
        if op == "backward":
            assert any(line.startswith(grad_check) for line in statements[:6])


def test_cuda_build_compiles_what_build_toml_lists(config, monkeypatch, tmp_path):
    """The compile step of a CUDA build (stopped before the compiler runs; this torch has no CUDA): the CUDA kernel's
    sources and flags, and TORCH_CUDA_ARCH_LIST from its capabilities, cut to what the (here: CUDA 12.6-like) nvcc
    supports."""
    import json

    captured = {}

    class Stop(Exception):
        pass

    def fake_run(cmd, verbose, what, log, extra_env=None, tick=None, tick_seconds=1.0):
        captured["cfg"], captured["env"] = json.loads(cmd[-1]), extra_env
        raise Stop

    monkeypatch.setattr(build, "_cuda_wanted", lambda cuda: True)
    monkeypatch.setattr(build, "torch_variant", lambda cuda=None: "test-variant")
    monkeypatch.setattr(build, "nvcc_capabilities", lambda nvcc=None: {"7.5", "8.0", "8.6", "8.7", "8.9", "9.0"})
    monkeypatch.setattr(build, "_run", fake_run)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    with pytest.raises(Stop):
        build.build_kernels(cache_dir=tmp_path, cuda=True, force=True)
    cfg, kernel = captured["cfg"], config["kernel"]["dcnv3_cuda"]
    compiled = [s for s in config["torch"]["src"] + kernel["src"] if s.endswith((".cpp", ".cu"))]
    assert [Path(s).relative_to(CSRC).as_posix() for s in cfg["sources"]] == compiled
    assert cfg["with_cuda"] and set(kernel["cxx-flags"]) <= set(cfg["cflags"]) and "-DDCNV3_WITH_CUDA" in cfg["cflags"]
    assert cfg["cuda_cflags"][-len(kernel["cuda-flags"]) :] == kernel["cuda-flags"]
    assert captured["env"] == {"TORCH_CUDA_ARCH_LIST": "7.5;8.0;8.6;8.9;9.0+PTX"}
