"""DCNv3 and DCNv4 as Hub-kernel layers (`ops/hub.py`): `DCNv3Core` (and `DCNv4Core`, at the end) is decorated with
`use_kernel_forward_from_hub`, its mapping (cpu, cuda) is registered on import, and `from_pretrained(use_kernels=...)`
/ `kernels.kernelize` swap the compiled layer in (or keep the reference). Every kernel fault degrades to the
reference with one warning."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import transformers

import internimage_hf
from internimage_hf.ops import (
    DCNv3Core,
    DCNv3KernelWarning,
    DCNv4Core,
    dcnv4_core_reference,
    hub,
    loader,
    use_reference,
)
from internimage_hf.ops.hub import DCNV4_REPOSITORIES, REPOSITORIES, ReferenceDCNv3Core, ReferenceDCNv4Core

from .conftest import REPO, rel_err
from .test_kernels import _break

kernels = pytest.importorskip("kernels")

KERNELIZES_BY_DEFAULT = tuple(int(p) for p in transformers.__version__.split(".")[:2]) >= (5, 25)
# transformers 5.25 kernelizes only with kernels >= 0.19.1 (the window admits 0.18.3: see the test below)
needs_transformers_kernels = pytest.mark.skipif(
    not transformers.modeling_utils.is_kernels_available(),
    reason="this transformers refuses to kernelize with the installed kernels release",
)
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _model(cpu_layers: bool = True):
    """A model built from a config (DCNv3 layers on their own dispatch). With cpu_layers, its Linear/MLP modules get
    the oneDNN CPU layers that `kernelize` also swaps in, so that outputs compare bit for bit with kernelized ones."""
    config = internimage_hf.InternImageConfig(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8], num_labels=3)
    torch.manual_seed(0)
    model = internimage_hf.InternImageForImageClassification(config).eval()
    with torch.no_grad():  # offsets of a few pixels, so that the sampling is not on the regular grid
        for name, p in model.named_parameters():
            if name.endswith("offset.weight") or name.endswith("mask.weight"):
                p.normal_(0, 0.5)
    if cpu_layers:
        for module in model.modules():
            if type(module).__name__ in ("InternImageLinear", "InternImageMLP"):
                kernels.kernelize(module, device="cpu", mode=kernels.Mode.INFERENCE)
    return model


def _cores(model):
    cores = [m for m in model.modules() if isinstance(m, DCNv3Core)]
    assert cores
    return cores


def _kind(model) -> str:
    """What every DCNv3Core of the model runs: 'kernel', 'reference', 'reference-layer' or 'dispatch'."""
    kinds = set()
    for core in _cores(model):
        forward = core.__dict__.get("forward")
        if forward is None or forward.__func__ is DCNv3Core.forward:  # kernels < 0.19 binds the class forward
            kinds.add("reference")
        elif forward.__func__ is ReferenceDCNv3Core.forward:
            kinds.add("reference-layer")
        elif forward.__func__ is DCNv3Core._dispatch_forward:
            kinds.add("dispatch")
        else:
            assert forward.__func__.__qualname__ == "guarded_layer.<locals>.forward", forward
            kinds.add("kernel")
    assert len(kinds) == 1, kinds
    return kinds.pop()


def _ours(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, DCNv3KernelWarning)]


@pytest.fixture
def saved(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "model")
    with torch.no_grad():
        reference = use_reference(_model())(X).logits
    return tmp_path / "model", reference


@pytest.fixture
def local_build(kernel_dir, monkeypatch):
    """The mapping decides afresh, with the session's build as the local build and no Hub repo or backend set."""
    monkeypatch.setenv("INTERNIMAGE_HF_KERNEL_CACHE", str(kernel_dir.parents[1]))
    for name in ("INTERNIMAGE_DCNV3_KERNEL_REPO", "INTERNIMAGE_DCNV3_BACKEND", "LOCAL_KERNELS"):
        monkeypatch.delenv(name, raising=False)
    loader._reset()
    yield kernel_dir
    loader._reset()


# ------------------------------------------------------------------------------------------------ the registration
def test_layer_is_decorated_and_mapped_for_cpu_and_cuda():
    assert DCNv3Core.kernel_layer_name == "DCNv3Core"
    mapping = hub.kernel_mapping()["DCNv3Core"]
    assert set(mapping) == {"cpu", "cuda"} and all(isinstance(r, hub.CoreLayerRepository) for r in mapping.values())
    registry = getattr(sys.modules[kernels.LocalLayerRepository.__module__], "_KERNEL_MAPPING", None)
    if registry is None:
        pytest.skip("kernels' global mapping moved (private API)")
    assert {"cpu", "cuda"} <= set(registry.get()["DCNv3Core"])


def test_mapping_survives_use_kernel_mapping_and_copies(local_build):
    """`use_kernel_mapping` (and transformers' kernel_config) deep-copy the inherited mapping: ours stays usable."""
    import copy
    import pickle

    repo = REPOSITORIES["cpu"]
    assert copy.deepcopy(repo) is repo and copy.copy(repo) is repo and pickle.loads(pickle.dumps(repo)) is repo
    model = _model()
    with kernels.use_kernel_mapping(
        {"SomethingElse": {"cpu": kernels.LocalLayerRepository(repo_path=local_build, layer_name="X")}}
    ):
        kernels.kernelize(model, device="cpu", mode=kernels.Mode.INFERENCE)
    assert _kind(model) == "kernel"


def test_registration_reads_nothing_and_requests_nothing(tmp_path):
    """A fresh process that imports the package and registers the mapping has decided nothing yet."""
    script = "import internimage_hf.ops.hub as h; assert all(r._layer is None for r in h.REPOSITORIES.values())"
    env = dict(os.environ, INTERNIMAGE_HF_KERNEL_CACHE=str(tmp_path / "nothing"), PYTHONPATH=str(REPO / "src"))
    env.update(HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9", INTERNIMAGE_DCNV3_KERNEL_REPO="org/repo")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "nothing").exists()


# ------------------------------------------------------------------------------- swapping the layer (local build)
def test_model_from_config_runs_the_compiled_op_without_extra_calls(local_build):
    model = _model()
    assert _kind(model) == "dispatch"
    with torch.no_grad():
        out = model(X).logits
    assert loader.kernel_status()["source"].startswith("local build")
    with torch.no_grad():
        assert rel_err(out, use_reference(_model())(X).logits) < 1e-5


@needs_transformers_kernels
def test_from_pretrained_use_kernels_true_swaps_in_the_compiled_layer(local_build, saved):
    folder, reference = saved
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = transformers.AutoModelForImageClassification.from_pretrained(folder, use_kernels=True)
    assert not _ours(record)
    assert _kind(model) == "kernel" and REPOSITORIES["cpu"].source.startswith("local build")
    with torch.no_grad():
        out = model(X).logits
        # the same numbers as the compiled path of a model built from a config (dcnv3_core's dispatcher)
        assert torch.equal(out, _model()(X).logits)
    assert rel_err(out, reference) < 1e-5


@needs_transformers_kernels
def test_from_pretrained_default_follows_transformers(local_build, saved):
    folder, _ = saved
    model = transformers.AutoModelForImageClassification.from_pretrained(folder)
    assert _kind(model) == ("kernel" if KERNELIZES_BY_DEFAULT else "dispatch")


def test_from_pretrained_use_kernels_false_keeps_the_reference(local_build, saved):
    folder, reference = saved
    model = transformers.AutoModelForImageClassification.from_pretrained(folder, use_kernels=False)
    if not KERNELIZES_BY_DEFAULT:  # before 5.25 False is the default: the layers stay as built
        assert _kind(model) == "dispatch"
        return
    assert _kind(model) == "reference"
    with torch.no_grad():  # and plain Linear/MLP layers: nothing was kernelized
        assert torch.equal(model(X).logits, use_reference(_model(cpu_layers=False))(X).logits)


def test_kernels_release_transformers_refuses_degrades_with_one_warning(local_build, saved, monkeypatch):
    """transformers 5.25 kernelizes by default but refuses kernels < 0.19.1 (ValueError from from_pretrained): the
    model loads anyway, with one warning, on its own dispatch (the compiled op)."""
    monkeypatch.setattr(transformers.modeling_utils, "is_kernels_available", lambda: False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = transformers.AutoModelForImageClassification.from_pretrained(saved[0], use_kernels=True)
    ours = _ours(record)
    assert len(ours) == 1 and "cannot kernelize" in ours[0], ours
    assert _kind(model) == "dispatch"
    with torch.no_grad():
        assert torch.equal(model(X).logits, _model(cpu_layers=False)(X).logits)


def test_kernelize_swaps_and_resets(local_build):
    model = _model()
    kernels.kernelize(model, device="cpu", mode=kernels.Mode.INFERENCE)
    assert _kind(model) == "kernel"
    with torch.no_grad():
        assert torch.equal(model(X).logits, _model()(X).logits)
    # a device without a mapping: kernels' own fallback, the class forward (the reference)
    kernels.kernelize(model, device="mps", mode=kernels.Mode.INFERENCE)
    assert _kind(model) == "reference"


def test_kernelized_training_gradients_match_the_reference(local_build):
    model = _model().train()
    kernels.kernelize(model, device="cpu", mode=kernels.Mode.TRAINING)
    assert _kind(model) == "kernel"
    ref = use_reference(_model()).train()
    for m in (model, ref):
        m(X).logits.square().sum().backward()
    grads = [torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]) for m in (model, ref)]
    assert rel_err(*grads) < 1e-5


def test_torch_compile_fullgraph_of_the_kernelized_model_matches_eager(local_build):
    model = _model()
    kernels.kernelize(model, device="cpu", mode=kernels.Mode.INFERENCE | kernels.Mode.TORCH_COMPILE)
    assert _kind(model) == "kernel"
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, fullgraph=True)
        with torch.no_grad():
            eager = model(X).logits
            assert rel_err(compiled(X).logits, eager) < 1e-5
    finally:  # later compilations of the same code must not start from this one (automatic dynamic shapes)
        torch._dynamo.reset()


def test_backend_reference_gives_the_reference_layer_without_a_warning(local_build, monkeypatch):
    monkeypatch.setenv("INTERNIMAGE_DCNV3_BACKEND", "reference")
    model = _model()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        kernels.kernelize(model, device="cpu", mode=kernels.Mode.INFERENCE)
    assert _kind(model) == "reference-layer" and not _ours(record)


def test_backend_compiled_without_a_kernel_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERNIMAGE_HF_KERNEL_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("INTERNIMAGE_DCNV3_BACKEND", "compiled")
    monkeypatch.delenv("INTERNIMAGE_DCNV3_KERNEL_REPO", raising=False)
    loader._reset()
    try:
        with pytest.raises(RuntimeError, match="build-kernels"):
            kernels.kernelize(_model(), device="cpu", mode=kernels.Mode.INFERENCE)
    finally:
        loader._reset()


# ------------------------------------------------------------------ faults: one warning, then the reference
def _raiser(exc):
    def load(self):
        raise exc

    return load


HUB_FAULTS = {
    "untrusted": ValueError("Repository org/dcnv3 is not from a trusted kernel publisher"),
    "unreachable": OSError("Cannot reach https://huggingface.co: connection refused"),
    "digest-mismatch": RuntimeError(
        "Kernel 'internimage-dcnv3' variant 'torch213-cxx11-cpu-x86_64-linux': the files do not match the digest"
    ),
    "gpu-arch": RuntimeError("Kernel 'internimage-dcnv3' does not support compute capability 6.1"),
}
LOCAL_FAULTS = {  # what kernels itself may raise while importing a build that passed our checks
    "digest-mismatch": RuntimeError("Kernel 'internimage-dcnv3': the files do not match the digest in the metadata"),
    "gpu-arch": RuntimeError("Kernel 'internimage-dcnv3' does not support compute capability 6.1"),
    "bad-library": OSError("_internimage_dcnv3.so: invalid ELF header"),
    "no-variant": FileNotFoundError("no compatible build variant"),
}


def _check_degrades(folder, reference, match):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = transformers.AutoModelForImageClassification.from_pretrained(folder, use_kernels=True)
        kernels.kernelize(model, device="cpu", mode=kernels.Mode.INFERENCE)  # again: decided once
        with torch.no_grad():
            out = model(X).logits
            model(X)
    ours = _ours(record)
    assert len(ours) == 1, ours
    assert match in ours[0] and "build-kernels" in ours[0], ours[0]
    assert _kind(model) == "reference-layer"
    assert torch.equal(out, reference)


@needs_transformers_kernels
@pytest.mark.parametrize("kind", ["missing", "corrupt-metadata", "corrupt-library", "stale", "not-a-folder"])
def test_broken_local_build_degrades_with_one_warning(kernel_dir, saved, tmp_path, monkeypatch, kind):
    """The loader's checks run before kernels imports anything: a truncated library is never mapped."""
    root = tmp_path / "cache"
    _break(kind, root, kernel_dir)
    monkeypatch.setenv("INTERNIMAGE_HF_KERNEL_CACHE", str(root))
    monkeypatch.delenv("INTERNIMAGE_DCNV3_KERNEL_REPO", raising=False)
    monkeypatch.delenv("INTERNIMAGE_DCNV3_BACKEND", raising=False)
    imported = []
    monkeypatch.setattr(kernels.LocalLayerRepository, "load", lambda self: imported.append(self) or 1 / 0)
    loader._reset()
    try:
        _check_degrades(*saved, match=str(root / "build") if kind == "missing" else str(root))
    finally:
        loader._reset()
    assert not imported


@needs_transformers_kernels
@pytest.mark.parametrize("fault", sorted(LOCAL_FAULTS))
def test_kernels_failing_on_the_local_build_degrades_with_one_warning(local_build, saved, monkeypatch, fault):
    monkeypatch.setattr(kernels.LocalLayerRepository, "load", _raiser(LOCAL_FAULTS[fault]))
    _check_degrades(*saved, match=str(LOCAL_FAULTS[fault]))


@needs_transformers_kernels
@pytest.mark.parametrize("fault", sorted(HUB_FAULTS))
def test_hub_kernel_faults_degrade_with_one_warning(saved, tmp_path, monkeypatch, fault):
    monkeypatch.setenv("INTERNIMAGE_DCNV3_KERNEL_REPO", "org/dcnv3")
    monkeypatch.setenv("INTERNIMAGE_HF_KERNEL_CACHE", str(tmp_path / "empty"))
    monkeypatch.delenv("INTERNIMAGE_DCNV3_BACKEND", raising=False)
    monkeypatch.setattr(kernels.LayerRepository, "load", _raiser(HUB_FAULTS[fault]))
    loader._reset()
    try:
        _check_degrades(*saved, match=str(HUB_FAULTS[fault]))
    finally:
        loader._reset()


@needs_transformers_kernels
def test_failing_hub_kernel_falls_back_to_the_local_build_with_one_warning(local_build, saved, monkeypatch):
    monkeypatch.setenv("INTERNIMAGE_DCNV3_KERNEL_REPO", "org/dcnv3")
    monkeypatch.setattr(kernels.LayerRepository, "load", _raiser(HUB_FAULTS["untrusted"]))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = transformers.AutoModelForImageClassification.from_pretrained(saved[0], use_kernels=True)
    ours = _ours(record)
    assert len(ours) == 1 and "org/dcnv3" in ours[0] and "local build" in ours[0], ours
    assert _kind(model) == "kernel"


@needs_transformers_kernels
def test_hub_kernel_through_local_kernels_override(local_build, saved, monkeypatch):
    """The Hub source (a kernels.LayerRepository) exercised offline: LOCAL_KERNELS points the repo at the build."""
    repo = "internimage-hf-test/internimage-dcnv3"
    monkeypatch.setenv("LOCAL_KERNELS", f"{repo}={local_build.parents[1]}")
    monkeypatch.setenv("INTERNIMAGE_DCNV3_KERNEL_REPO", repo)
    monkeypatch.setenv("INTERNIMAGE_HF_KERNEL_CACHE", str(local_build.parents[1] / "no-such-cache"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = transformers.AutoModelForImageClassification.from_pretrained(saved[0], use_kernels=True)
    assert not _ours(record)
    assert _kind(model) == "kernel" and REPOSITORIES["cpu"].source.startswith(f"Hub kernel {repo}")
    with torch.no_grad():
        assert rel_err(model(X).logits, saved[1]) < 1e-5


@needs_transformers_kernels
@pytest.mark.parametrize(
    "network",
    [
        {"HF_HUB_OFFLINE": "1"},
        {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2"},
    ],
    ids=["offline", "unreachable"],
)
def test_configured_hub_repo_offline_or_unreachable_in_a_fresh_process(saved, tmp_path, network):
    """Real faults, no patching: the configured repo cannot be fetched and there is no local build."""
    script = textwrap.dedent("""
        import sys, warnings, torch, transformers
        from internimage_hf.ops import use_reference
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as record:
            model = transformers.AutoModelForImageClassification.from_pretrained(sys.argv[1], use_kernels=True)
            x = torch.randn(1, 3, 32, 32)
            with torch.no_grad():
                out = model(x).logits
                assert torch.equal(out, use_reference(model)(x).logits)
        ours = [str(w.message) for w in record if type(w.message).__name__ == "DCNv3KernelWarning"]
        assert len(ours) == 1 and "org/dcnv3" in ours[0] and "build-kernels" in ours[0], ours
        print("OK")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    env.update(network, INTERNIMAGE_DCNV3_KERNEL_REPO="org/dcnv3", INTERNIMAGE_HF_KERNEL_CACHE=str(tmp_path / "e"))
    env.pop("INTERNIMAGE_DCNV3_BACKEND", None)
    env.pop("LOCAL_KERNELS", None)
    proc = subprocess.run(
        [sys.executable, "-c", script, str(saved[0])], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------------ DCNv4Core
class _V4Block(torch.nn.Module):
    """The smallest model around a DCNv4Core: what kernelize walks."""

    def __init__(self):
        super().__init__()
        self.core = DCNv4Core()

    def forward(self, x, offset_mask, *args):
        return self.core(x, offset_mask, *args)


def _v4_case(dtype=torch.float64):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 7, 6, 2 * 8, generator=g, dtype=dtype)
    om = torch.randn(2, 7, 6, 56, generator=g, dtype=dtype) * 2  # G * 3P = 54, padded to 56
    return x, om, (3, 3, 1, 1, 1, 1, 1, 1, 2, 8, 1.0, 0)


def _v4_kind(block) -> str:
    forward = block.core.__dict__.get("forward")
    if forward is None or forward.__func__ is DCNv4Core.forward:
        return "reference"
    if forward.__func__ is ReferenceDCNv4Core.forward:
        return "reference-layer"
    if forward.__func__ is DCNv4Core._dispatch_forward:
        return "dispatch"
    assert forward.__func__.__qualname__ == "guarded_layer.<locals>.forward", forward
    return "kernel"


def test_dcnv4_layer_is_decorated_and_mapped_for_cpu_and_cuda():
    assert DCNv4Core.kernel_layer_name == "DCNv4Core"
    mapping = hub.kernel_mapping()["DCNv4Core"]
    assert set(mapping) == {"cpu", "cuda"} and all(r.layer_name == "DCNv4Core" for r in mapping.values())
    registry = getattr(sys.modules[kernels.LocalLayerRepository.__module__], "_KERNEL_MAPPING", None)
    if registry is None:
        pytest.skip("kernels' global mapping moved (private API)")
    assert {"cpu", "cuda"} <= set(registry.get()["DCNv4Core"])


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_kernelize_swaps_dcnv4core_for_the_local_build(local_build, mode):
    block = _V4Block()
    assert _v4_kind(block) == "dispatch"
    kernel_mode = kernels.Mode.INFERENCE if mode == "inference" else kernels.Mode.TRAINING
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        kernels.kernelize(block, device="cpu", mode=kernel_mode)
    assert not _ours(record)
    assert _v4_kind(block) == "kernel" and DCNV4_REPOSITORIES["cpu"].source.startswith("local build")
    x, om, args = _v4_case()
    x.requires_grad_()
    om.requires_grad_()
    out = block(x, om, *args)
    grads = torch.autograd.grad(out.square().sum(), (x, om))
    x_r, om_r = x.detach().requires_grad_(), om.detach().requires_grad_()
    ref = dcnv4_core_reference(x_r, om_r, *args)
    grads_ref = torch.autograd.grad(ref.square().sum(), (x_r, om_r))
    assert rel_err(out, ref) < 1e-12
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(grads, grads_ref))
    # float16 on the CPU is not in the build: the guarded layer runs the reference
    assert block(x.detach().half(), om.detach().half(), *args).dtype == torch.float16
    assert _v4_kind(use_reference(block)) == "reference"


def test_dcnv4_kernels_fault_degrades_with_one_warning(local_build, monkeypatch):
    monkeypatch.setattr(kernels.LocalLayerRepository, "load", _raiser(LOCAL_FAULTS["bad-library"]))
    block = _V4Block()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):  # decided once
            kernels.kernelize(block, device="cpu", mode=kernels.Mode.INFERENCE)
    ours = _ours(record)
    assert len(ours) == 1 and "DCNv4 layers" in ours[0] and "invalid ELF header" in ours[0], ours
    assert _v4_kind(block) == "reference-layer"
    x, om, args = _v4_case()
    assert torch.equal(block(x, om, *args), dcnv4_core_reference(x, om, *args))


def test_dcnv4_kernel_package_without_the_op_degrades_with_one_warning(local_build, monkeypatch):
    """A build made before DCNv4 has no DCNv4 op: the DCNv4Core mapping degrades, DCNv3Core keeps the kernel."""
    import dataclasses

    old = dataclasses.replace(hub.CORE_LAYERS["DCNv4Core"], available=lambda op: False)
    monkeypatch.setitem(hub.CORE_LAYERS, "DCNv4Core", old)
    block = _V4Block()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        kernels.kernelize(block, device="cpu", mode=kernels.Mode.INFERENCE)
    ours = _ours(record)
    assert len(ours) == 1 and "has no DCNv4Core op" in ours[0], ours
    assert _v4_kind(block) == "reference-layer"
    model = _model()
    kernels.kernelize(model, device="cpu", mode=kernels.Mode.INFERENCE)
    assert _kind(model) == "kernel"
