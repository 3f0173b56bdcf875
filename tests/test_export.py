"""Export: ONNX (both torch.onnx exporters) checked in onnxruntime at two input sizes, and torch.export."""

from __future__ import annotations

import contextlib

import pytest
import torch

from internimage_hf import InternImageBackbone, InternImageConfig, InternImageForImageClassification
from internimage_hf.export import export_onnx, export_program, validate_onnx

from .conftest import rel_err
from .test_training import randomise_offsets

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TINY = dict(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8], image_size=64)
SIZES = [(64, 64), (96, 80)]  # two sizes, one not square and not a multiple of 32


@pytest.fixture
def compiled_backend_required(monkeypatch):
    """A context in which the compiled DCNv3 kernel is demanded (where none is built, any eager call raises).

    Exports inside it pass only because they always route to the pure-PyTorch reference."""

    @contextlib.contextmanager
    def demand_compiled():
        with monkeypatch.context() as patch:
            patch.setenv("INTERNIMAGE_DCNV3_BACKEND", "compiled")
            yield

    return demand_compiled


def tiny(model_class, **overrides):
    torch.manual_seed(0)
    model = model_class(InternImageConfig(**{**TINY, **overrides})).eval()
    randomise_offsets(model)
    return model


def test_classifier_onnx_dynamo_matches_pytorch_at_two_sizes(tmp_path, compiled_backend_required):
    model = tiny(InternImageForImageClassification, num_labels=7)
    with compiled_backend_required():
        path = export_onnx(model, tmp_path / "classifier.onnx")
    import onnx

    graph = onnx.load(str(path)).graph
    assert "GridSample" in {node.op_type for node in graph.node}  # the reference DCNv3, standard ops only
    assert [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim][1] == 3
    records = validate_onnx(path, model, SIZES, batch_size=3)
    assert [r["image_size"] for r in records] == SIZES
    for record in records:
        assert record["max_relative_error"] < 1e-4, record


def test_backbone_onnx_torchscript_exporter_matches_pytorch_at_two_sizes(tmp_path, compiled_backend_required):
    model = tiny(InternImageBackbone, out_features=["stage1", "stage2", "stage3", "stage4"])
    with compiled_backend_required():
        path = export_onnx(model, tmp_path / "backbone.onnx", dynamo=False)
    records = validate_onnx(path, model, SIZES, batch_size=2)
    for record in records:
        assert set(record["outputs"]) == {"stage1", "stage2", "stage3", "stage4"}
        assert record["max_relative_error"] < 1e-4, record


def test_torch_export_program_runs_other_sizes_with_the_reference_op(compiled_backend_required):
    model = tiny(InternImageForImageClassification, num_labels=5)
    with compiled_backend_required():
        program = export_program(model)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert any("grid_sampler" in t for t in targets)
    assert not any("dcnv3" in t.lower() for t in targets)  # no custom (compiled-kernel) op in the graph
    exported = program.module()
    for height, width in SIZES:
        pixel_values = torch.randn(2, 3, height, width)
        with torch.no_grad():
            expected = model(pixel_values=pixel_values).logits
        (logits,) = exported(pixel_values)
        assert rel_err(logits, expected) < 1e-5


def test_export_rejects_example_inputs_the_dynamic_graph_cannot_cover(tmp_path):
    model = tiny(InternImageForImageClassification, num_labels=2)
    with pytest.raises(ValueError, match=">= 33"):
        export_onnx(model, tmp_path / "x.onnx", image_size=32)


def test_cpu_layers_see_an_onnx_export_in_progress(monkeypatch):
    """The kernelized CPU layers step aside during export: their check must read the flags torch sets."""
    import torch

    from internimage_hf.ops.cpu_layers import _tracing

    assert not _tracing() and not torch.onnx.is_in_onnx_export()
    globals_module = pytest.importorskip(
        "torch.onnx._internal.torchscript_exporter._globals",
        reason="torch moved its private ONNX flags (this test sets one)",
    )
    GLOBALS = globals_module.GLOBALS

    monkeypatch.setattr(GLOBALS, "in_onnx_export", True)
    assert torch.onnx.is_in_onnx_export() and _tracing()
