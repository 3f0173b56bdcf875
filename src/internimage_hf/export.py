"""Export InternImage to ONNX (`torch.onnx.export`) and to `torch.export` programs, and check ONNX with onnxruntime.

Which DCNv3 implementation ends up in the exported graph: always the pure-PyTorch reference
(`internimage_hf.ops.dcnv3_core_reference`). `dcnv3_core` switches to it by itself whenever
`torch.onnx.is_in_onnx_export()` (both ONNX exporters set it) or `torch.compiler.is_exporting()` (`torch.export`)
is true, whatever `INTERNIMAGE_DCNV3_BACKEND` says. The reference is made only of standard operators (linear
algebra, `grid_sample` = ONNX `GridSample`, opset >= 16), so any ONNX runtime can execute the graph, and a
`torch.export` program does not depend on the compiled kernel package being importable where it is loaded. The
compiled kernel is a custom operator that no ONNX runtime knows.

Exported graphs take any batch size and any height/width >= 33 (dynamic axes; see `MIN_SIDE`); InternImage-H/G
take sides that are multiples of 32, from 64.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .modeling_internimage import InternImageBackbone, InternImageForImageClassification, InternImageModel
from .utils import relative_error

DEFAULT_OPSET = 18
# Exported graphs take sides >= 33: a 32-pixel side makes stage 4 one pixel wide, and torch.export compiles size-1
# dimensions as constants (its 0/1 specialisation), so it cannot cover 32 and larger sizes in one graph.
MIN_SIDE = 33


class ExportWrapper(nn.Module):
    """`pixel_values -> tuple of tensors` for any InternImage model class (what exporters want: no dataclasses).

    Classifier: (logits,); base model: (last_hidden_state, pooler_output); backbone: one feature map per
    `out_features` entry. `output_names` lists the names in that order.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        if isinstance(model, InternImageForImageClassification):
            self.output_names = ["logits"]
        elif isinstance(model, InternImageModel):
            self.output_names = ["last_hidden_state", "pooler_output"]
        elif isinstance(model, InternImageBackbone):
            self.output_names = list(model.out_features)
        else:
            raise TypeError(
                f"Cannot export {type(model).__name__}: expected an InternImage classifier, model or backbone"
            )

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(pixel_values=pixel_values, return_dict=True)
        if isinstance(self.model, InternImageForImageClassification):
            return (out.logits,)
        if isinstance(self.model, InternImageModel):
            return (out.last_hidden_state, out.pooler_output)
        return tuple(out.feature_maps)


def _example_input(
    model: nn.Module, image_size: int | Sequence[int] | None, batch_size: int, dynamic: bool
) -> torch.Tensor:
    """Random pixel_values; the default size is the config's, raised to 64 for a dynamic export of a tiny config."""
    if image_size is None:
        image_size = model.config.image_size if not dynamic else max(model.config.image_size, 64)
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if dynamic and min(height, width) < MIN_SIDE:
        raise ValueError(
            f"A dynamic-shape export needs an example input with sides >= {MIN_SIDE}; got {height}x{width}"
        )
    param = next(model.parameters())
    return torch.randn(batch_size, model.config.num_channels, height, width, dtype=param.dtype, device=param.device)


def _dynamic_shapes(model: nn.Module) -> dict:
    """Batch, height and width are dynamic (H/G: multiples of 32, which their head needs)."""
    from torch.export import Dim

    batch = Dim("batch", min=1)
    if getattr(model.config, "input_multiple", 1) > 1:
        step = model.config.input_multiple
        height, width = step * Dim("height_blocks", min=2), step * Dim("width_blocks", min=2)
    else:
        height, width = Dim("height", min=MIN_SIDE), Dim("width", min=MIN_SIDE)
    return {"pixel_values": {0: batch, 2: height, 3: width}}


def export_onnx(
    model: nn.Module,
    path: str | Path,
    image_size: int | Sequence[int] | None = None,
    batch_size: int = 2,
    dynamic: bool = True,
    opset_version: int = DEFAULT_OPSET,
    dynamo: bool = True,
) -> Path:
    """Export an InternImage classifier, base model or backbone to ONNX; returns the path.

    `image_size`: the example input's size (default: the config's `image_size`, at least 64 when dynamic); with
    `dynamic` the graph accepts any batch and any height/width >= `MIN_SIDE`. `dynamo=True` uses the
    torch.export-based exporter (the default of current torch), `dynamo=False` the TorchScript-based one. The graph
    input is `pixel_values`; outputs are named as in `ExportWrapper`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = ExportWrapper(model).eval()
    example = _example_input(model, image_size, batch_size, dynamic)
    kwargs = dict(
        input_names=["pixel_values"], output_names=wrapper.output_names, opset_version=opset_version, dynamo=dynamo
    )
    if dynamic and dynamo:
        kwargs["dynamic_shapes"] = _dynamic_shapes(model)
    elif dynamic:
        kwargs["dynamic_axes"] = {"pixel_values": {0: "batch", 2: "height", 3: "width"}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter announces its retirement
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks traced as constants: expected
        program = torch.onnx.export(wrapper, (example,), None if dynamo else str(path), **kwargs)
    if dynamo:
        program.save(str(path))
    return path


def export_program(
    model: nn.Module,
    image_size: int | Sequence[int] | None = None,
    batch_size: int = 2,
    dynamic: bool = True,
    strict: bool = False,
) -> torch.export.ExportedProgram:
    """`torch.export.export` of the model (wrapped by `ExportWrapper`), with dynamic batch/height/width."""
    wrapper = ExportWrapper(model).eval()
    example = _example_input(model, image_size, batch_size, dynamic)
    return torch.export.export(
        wrapper, (example,), dynamic_shapes=_dynamic_shapes(model) if dynamic else None, strict=strict
    )


def validate_onnx(
    path: str | Path,
    model: nn.Module,
    image_sizes: Sequence[int | Sequence[int]] = ((64, 64), (96, 80)),
    batch_size: int = 2,
    seed: int = 0,
) -> list[dict]:
    """Run the ONNX file with onnxruntime (CPU) and the PyTorch model on the same random inputs, per size.

    Returns one record per size: `image_size`, `outputs` (name -> relative error, see `relative_error`) and
    `max_relative_error`.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wrapper = ExportWrapper(model).eval()
    generator = torch.Generator().manual_seed(seed)
    records = []
    for size in image_sizes:
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        pixel_values = torch.randn(batch_size, model.config.num_channels, height, width, generator=generator)
        param = next(model.parameters())
        with torch.no_grad():
            expected = wrapper(pixel_values.to(device=param.device, dtype=param.dtype))
        actual = session.run(wrapper.output_names, {"pixel_values": pixel_values.numpy()})
        errors = {
            name: relative_error(a, e.float().cpu()) for name, a, e in zip(wrapper.output_names, actual, expected)
        }
        records.append({"image_size": (height, width), "outputs": errors, "max_relative_error": max(errors.values())})
    return records


__all__ = ["ExportWrapper", "export_onnx", "export_program", "relative_error", "validate_onnx"]
