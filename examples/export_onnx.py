"""Export InternImage (classifier or backbone) to ONNX and check it against PyTorch with onnxruntime.

    python examples/export_onnx.py                                        # tiny random classifier
    python examples/export_onnx.py --model path/to/internimage_t --output internimage_t.onnx --image-size 224
    python examples/export_onnx.py --model path/to/internimage_t --backbone --exporter torchscript

The graph has dynamic batch, height and width (any side >= 33). DCNv3 is exported as the pure-PyTorch reference
(standard ONNX operators, GridSample among them), never as the compiled kernel: see examples/README.md.
"""

from __future__ import annotations

import argparse

import torch

from internimage_hf import InternImageBackbone, InternImageForImageClassification
from internimage_hf.export import export_onnx, validate_onnx
from internimage_hf.training import load_model_and_processor, model_presets


def size(text: str) -> tuple[int, int]:
    height, _, width = text.partition("x")
    return int(height), int(width or height)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help=f"folder, Hub id or preset ({', '.join(model_presets())})")
    parser.add_argument("--output", default="outputs/internimage.onnx")
    parser.add_argument("--backbone", action="store_true", help="export the stage1..stage4 feature maps instead")
    parser.add_argument("--image-size", type=int, default=None, help="example input size (default: the model's)")
    parser.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument(
        "--check-sizes",
        type=size,
        nargs="+",
        default=[(64, 64), (96, 80)],
        help="input sizes HxW compared with PyTorch in onnxruntime",
    )
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    if args.backbone:
        model, _ = load_model_and_processor(
            InternImageBackbone, args.model, out_features=["stage1", "stage2", "stage3", "stage4"]
        )
    else:
        model, _ = load_model_and_processor(InternImageForImageClassification, args.model)
    model.eval()
    path = export_onnx(
        model, args.output, image_size=args.image_size, opset_version=args.opset, dynamo=args.exporter == "dynamo"
    )
    print(f"exported {type(model).__name__} to {path} ({path.stat().st_size / 1e6:.1f} MB, {args.exporter} exporter)")
    for record in validate_onnx(path, model, args.check_sizes):
        height, width = record["image_size"]
        print(f"  {height}x{width}: onnxruntime vs PyTorch, max relative error {record['max_relative_error']:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
