"""Convert an official InternImage checkpoint to a transformers folder, check it, and (optionally) push it to the Hub.

    python examples/convert_and_push.py internimage_t_1k_224.pth converted/internimage-t-1k-224 --variant t
    python examples/convert_and_push.py internimage_t_1k_224.pth converted/internimage-t-1k-224 --variant t \\
        --push-to-hub your-name/internimage-t-1k-224

SOURCE is a local official `.pth` (downloaded from the Hub repo OpenGVLab/InternImage), a local OpenGVLab
remote-code repo folder, or a Hub source written explicitly as `hf://owner/name[/file.pth]` (e.g.
`hf://OpenGVLab/InternImage/internimage_t_1k_224.pth`); a local path that does not exist is an error, never a Hub
lookup. The variant is detected from the weights (`--variant` is checked against them).
The folder gets `config.json` (with ImageNet class names), `model.safetensors`, `preprocessor_config.json` and a
model card naming the target repo. The converted model is reloaded with the Auto classes and run once before
anything is uploaded (`huggingface_hub.HfApi().create_repo` + `upload_folder`). Without `--push-to-hub` this is a
dry run: it lists what would be uploaded. Pushing needs a token with write access (`hf auth login` or $HF_TOKEN).
The CLI does the same in one command: `internimage-hf convert SOURCE OUTPUT_DIR --push-to-hub REPO`; for all
official releases at once see conversion/README.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification

import internimage_hf  # noqa: F401  (registers the "internimage" model type with the Auto classes)
from internimage_hf.conversion.errors import ConversionError
from internimage_hf.conversion.hub import push_folder
from internimage_hf.conversion.pipeline import convert


def check(folder: Path) -> str:
    """Reload through the Auto classes and classify one image-sized random input; a one-line summary."""
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    size = processor.crop_size["height"]
    with torch.no_grad():
        logits = model(pixel_values=torch.randn(1, 3, size, size)).logits
    top = model.config.id2label[int(logits.argmax())]
    return (
        f"{type(model).__name__}, {model.num_parameters() / 1e6:.1f}M parameters, {size}x{size} input, "
        f"{model.config.num_labels} classes (random input -> {top!r})"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "source", help="official .pth file, OpenGVLab remote-code repo folder, or hf://owner/name[/file]"
    )
    parser.add_argument("output_dir", help="folder to create")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--variant", help="t, s, b, l, xl, h or g (default: detected from the weights)")
    which.add_argument("--official-config", help="JSON file of official InternImage(...) keyword arguments")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the folder to this Hub model repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--commit-message", default="Add InternImage converted from the official checkpoint")
    args = parser.parse_args(argv)

    try:
        folder = convert(
            args.source,
            args.output_dir,
            variant=args.variant,
            official_config=args.official_config,
            overwrite=args.overwrite,
            model_id=args.push_to_hub,
        )
    except (ConversionError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"converted {args.source} -> {folder}")
    print(f"check: {check(folder)}")

    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not args.push_to_hub:
        print("dry run (pass --push-to-hub REPO to upload); would upload:")
        for path in files:
            print(f"  {path.relative_to(folder)}  {path.stat().st_size / 1e6:.2f} MB")
        return 0
    try:
        url = push_folder(folder, args.push_to_hub, private=args.private, commit_message=args.commit_message)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"pushed {len(files)} files to {url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
