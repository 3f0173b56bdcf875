"""Parity with the official FlashInternImage (DCNv4), on the fixtures made by running the official code
(tests/fixtures/flash/README.md).

Each fixture checkpoint is converted with `internimage-hf convert --official-config` and loaded through the Auto
classes. Float64 is the sharp check: within 1e-10 of the official model run in float64. In float32 both sides carry
rounding noise that grows with depth (the sampling positions come from the features), so a float32 run must be no
further from the float64 reference than twice the official float32 output is, tensor by tensor.

The fixtures are found from this file's location (no conftest fixture needed), so the file also runs on its own.
"""

from __future__ import annotations

import json
import unittest
from functools import cache
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoBackbone, AutoModelForImageClassification, pipeline

from internimage_hf import InternImageConfig
from internimage_hf.cli import main as cli_main
from internimage_hf.modeling_internimage import InternImageDCNv4
from internimage_hf.ops import loader, resolve_backend
from internimage_hf.utils import relative_error

from . import test_modeling_internimage as _common

FLASH_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "flash"
CASES = ("flash_tiny_t", "flash_tiny_l")
STAGES = ["stage1", "stage2", "stage3", "stage4"]
OUTPUTS = ["logits", *STAGES]
FLOAT64_TOLERANCE = 1e-10
FLOAT32_FACTOR = 2.0
# Parameter counts of the official models built for the fixtures (fixture README).
OFFICIAL_PARAMS = {"flash_tiny_t": 1_712_626, "flash_tiny_l": 1_913_671}


def case_dir(case: str) -> Path:
    folder = FLASH_FIXTURES / case
    if not (folder / "checkpoint.pth").is_file():
        pytest.fail(f"FlashInternImage fixture {case!r} not found at {folder}")
    return folder


@cache
def official_outputs(case: str) -> tuple[dict, dict]:
    """(float32, float64) official outputs; both hold the same input."""
    expected32 = load_file(case_dir(case) / "expected.safetensors")
    expected64 = load_file(case_dir(case) / "expected_float64.safetensors")
    assert torch.equal(expected32["pixel_values"].double(), expected64["pixel_values"])
    return expected32, expected64


@pytest.fixture(scope="module", params=CASES)
def converted(request, tmp_path_factory) -> tuple[str, Path]:
    """(case, folder): the fixture checkpoint converted by the command line tool with its official config."""
    case = request.param
    out = tmp_path_factory.mktemp(case) / "model"
    folder = case_dir(case)
    args = ["convert", str(folder / "checkpoint.pth"), str(out), "--official-config"]
    assert cli_main([*args, str(folder / "official_config.json")]) == 0
    return case, out


@pytest.fixture(params=["reference", "compiled"])
def backend(request, monkeypatch):
    """Both DCNv4 paths: the compiled kernel must match the fixtures as the reference does."""
    if request.param == "compiled":
        request.getfixturevalue("use_kernel")
    monkeypatch.setenv("INTERNIMAGE_DCNV3_BACKEND", request.param)
    loader._reset()  # the kernel mappings decide afresh (an earlier test may have decided under another backend)
    yield request.param
    loader._reset()


def dcnv4_kind(model) -> str:
    """What the model's DCNv4 cores run: "compiled" or "reference". A kernelized core (transformers >= 5.25 kernelizes
    in `from_pretrained`) runs the layer it was given; a core on its own dispatch (earlier transformers) follows
    INTERNIMAGE_DCNV3_BACKEND, which the `backend` fixture sets."""
    core = model.internimage.encoder.levels[0].layers[0].dcn.core
    forward = core.__dict__.get("forward")
    name = getattr(getattr(forward, "__func__", None), "__qualname__", "")
    if name.endswith("_dispatch_forward"):
        return resolve_backend()
    return "compiled" if "guarded_layer" in name else "reference"


@cache
def run(case: str, folder: Path, dtype: torch.dtype, backend: str) -> dict[str, torch.Tensor]:
    """Logits and hidden states (classifier) and the four feature maps (backbone), in `dtype`, on the fixture input,
    with the DCNv4 layers on `backend`."""
    pixel_values = official_outputs(case)[1]["pixel_values"].to(dtype)
    model = AutoModelForImageClassification.from_pretrained(folder).eval().to(dtype)
    backbone = AutoBackbone.from_pretrained(folder, out_features=STAGES).eval().to(dtype)
    assert type(model).__name__ == "InternImageForImageClassification"
    assert type(backbone).__name__ == "InternImageBackbone"
    assert isinstance(model.internimage.encoder.levels[0].layers[0].dcn, InternImageDCNv4)
    assert dcnv4_kind(model) == backend
    with torch.no_grad():
        outputs = model(pixel_values, output_hidden_states=True)
        maps = backbone(pixel_values).feature_maps
    assert len(maps) == len(STAGES)
    return {
        "logits": outputs.logits,
        **dict(zip(STAGES, maps, strict=True)),
        **{f"classifier_{name}": outputs.hidden_states[i] for i, name in enumerate(STAGES, 1)},
    }


def test_converted_config_and_parameter_count(converted):
    case, folder = converted
    config = json.loads((folder / "config.json").read_text())
    official = json.loads((case_dir(case) / "official_config.json").read_text())
    assert config["model_type"] == "internimage" and config["core_op"] == "DCNv4"
    for field in ("dw_kernel_size", "dcn_output_bias", "mlp_fc2_bias", "offset_scale", "post_norm", "layer_scale"):
        assert config[field] == official[field], field
    model = AutoModelForImageClassification.from_pretrained(folder)
    assert model.num_parameters() == OFFICIAL_PARAMS[case]
    assert len(model.state_dict()) == len(torch.load(case_dir(case) / "checkpoint.pth", weights_only=True)["model"])


def test_float64_matches_official_float64(converted, backend):
    """Float64 in, float64 out: within 1e-10 of the official model run in float64 (logits and all four stages)."""
    case, folder = converted
    expected = official_outputs(case)[1]
    outputs = run(case, folder, torch.float64, backend)
    for name in OUTPUTS:
        assert outputs[name].dtype == torch.float64 and outputs[name].shape == expected[name].shape, name
    errors = {name: relative_error(outputs[name], expected[name]) for name in OUTPUTS}
    assert max(errors.values()) < FLOAT64_TOLERANCE, errors


def test_float32_within_official_float32_noise(converted, backend):
    """Float32 is no further from the float64 reference than FLOAT32_FACTOR x the official float32 output is."""
    case, folder = converted
    expected32, expected64 = official_outputs(case)
    outputs = run(case, folder, torch.float32, backend)
    for name in OUTPUTS:
        assert outputs[name].dtype == torch.float32 and outputs[name].shape == expected64[name].shape, name
        official = relative_error(expected32[name], expected64[name])
        error = relative_error(outputs[name], expected64[name])
        assert error <= FLOAT32_FACTOR * official, f"{name}: {error:.3g} vs official float32 {official:.3g}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backbone_stages_equal_the_classifier_hidden_states(converted, dtype, backend):
    """AutoBackbone and the classifier run the same trunk: the same stage tensors, bit for bit."""
    outputs = run(*converted, dtype, backend)
    for name in STAGES:
        assert torch.equal(outputs[name], outputs[f"classifier_{name}"]), name


def test_float64_plain_layers(converted):
    """Without kernelization (`use_kernels=False`: plain PyTorch layers) the same float64 parity."""
    case, folder = converted
    expected = official_outputs(case)[1]
    model = AutoModelForImageClassification.from_pretrained(folder, use_kernels=False).eval().to(torch.float64)
    with torch.no_grad():
        logits = model(expected["pixel_values"]).logits
    assert relative_error(logits, expected["logits"]) < FLOAT64_TOLERANCE


def test_pipeline_runs_on_a_converted_flash_model(converted):
    """The image-classification pipeline needs nothing FlashInternImage-specific (the processor is the usual one)."""
    _, folder = converted
    classify = pipeline("image-classification", model=str(folder))
    image = torch.rand(3, 90, 70).mul(255).to(torch.uint8).numpy().transpose(1, 2, 0)
    result = classify(Image.fromarray(image), top_k=3)
    assert len(result) == 3 and all(entry["label"].startswith("LABEL_") for entry in result)


def test_new_model_has_the_official_dcnv4_init():
    """offset_mask starts at zero (every point on the regular grid, zero mask), projections xavier-uniform with zero
    bias, offset_mask_dw PyTorch's default: what the official `_reset_parameters` leaves."""
    config = InternImageConfig.from_preset("tiny", core_op="DCNv4", dw_kernel_size=3, dcn_output_bias=True)
    model = AutoModelForImageClassification.from_config(config)
    for layer in model.modules():
        if not isinstance(layer, InternImageDCNv4):
            continue
        assert not layer.offset_mask.weight.any() and not layer.offset_mask.bias.any()
        for proj in (layer.value_proj, layer.output_proj):
            bound = (6 / sum(proj.weight.shape)) ** 0.5
            assert proj.weight.abs().max() <= bound and proj.weight.std() > bound / 3 and not proj.bias.any()
        fan_in = layer.offset_mask_dw.weight[0].numel()
        assert layer.offset_mask_dw.weight.abs().max() <= fan_in**-0.5 and layer.offset_mask_dw.weight.any()


# ------------------------------------------------------------------------------------------------ transformers' tests
# transformers' common model and backbone tests (the same testers as tests/test_modeling_internimage.py), on a small
# FlashInternImage config: save/load, init, training, gradient checkpointing, export and the backbone API.
class _FlashTester(_common.InternImageModelTester):
    def __init__(self, parent, **kwargs):
        super().__init__(parent, channels=16, groups=(1, 2, 2, 4), **kwargs)

    def get_config(self):
        config = super().get_config()
        config.core_op = "DCNv4"  # set first: the fields below resolve against it
        config.dw_kernel_size, config.dcn_output_bias, config.mlp_fc2_bias = 3, True, False
        return config


class FlashInternImageModelTest(_common.InternImageModelTest):
    def setUp(self):
        super().setUp()
        self.model_tester = _FlashTester(self)

    @unittest.skip(reason="dtype loading does not depend on the core op (test_modeling_internimage runs it); ~12 s")
    def test_bc_torch_dtype(self):
        pass


class FlashInternImageBackboneTest(_common.InternImageBackboneTest):
    def setUp(self):
        super().setUp()
        self.model_tester = _FlashTester(self)
