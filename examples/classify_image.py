"""Classify an image with a saved InternImage through `pipeline("image-classification")`.

    python examples/classify_image.py --model outputs/demo/model --image my_digit.png
    python examples/classify_image.py --model path/to/converted/internimage_t_1k_224 --image cat.jpg --top-k 5

`--model` is a `save_pretrained` folder (the demo's `outputs/demo/model`, or one made by `internimage-hf convert`)
or a Hub id. Without `--image` a digit is drawn (with a font, so it is not quite the demo's handwriting) and
classified. If the model folder does not exist (e.g. the demo
has not been run yet), a randomly initialised tiny model is saved to a temporary folder and used, so the script
still runs as written -- its predictions are then meaningless.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from transformers import pipeline

import internimage_hf  # noqa: F401  (registers the "internimage" model type with the Auto classes)
from internimage_hf import InternImageForImageClassification
from internimage_hf.training import load_model_and_processor

DEFAULT_MODEL = "outputs/demo/model"


def draw_digit(digit: int, size: int = 32) -> Image.Image:
    """A white digit on black made like scikit-learn's digits (what the demo trains on): a thick stroke centred in
    a square, averaged down to 8x8 blocks, then upsampled to `size` x `size`."""
    canvas = Image.new("L", (96, 96))
    font = ImageFont.load_default(size=72)
    ImageDraw.Draw(canvas).text((48, 50), str(digit), fill=255, font=font, anchor="mm", stroke_width=5, stroke_fill=255)
    glyph = canvas.crop(canvas.getbbox())
    side = int(max(glyph.size) * 1.1)
    square = Image.new("L", (side, side))
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    blocks = square.resize((8, 8), Image.BOX)
    return blocks.resize((size, size), Image.BICUBIC).convert("RGB")


def random_model_folder(folder: Path) -> Path:
    names = [str(i) for i in range(10)]
    model, processor = load_model_and_processor(
        InternImageForImageClassification,
        "tiny",
        num_labels=10,
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="save_pretrained folder or Hub id")
    parser.add_argument("--image", default=None, help="image file (default: a drawn digit)")
    parser.add_argument("--digit", type=int, default=7, choices=range(10), help="the digit drawn without --image")
    parser.add_argument("--top-k", type=int, default=3)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model == DEFAULT_MODEL and not Path(model).exists():
            print(f"{model} does not exist (run `internimage-hf demo` first); using a random tiny model instead")
            model = str(random_model_folder(Path(tmp) / "random-tiny"))
        if args.image:
            image, source = Image.open(args.image), args.image
        else:
            image, source = draw_digit(args.digit), f"a drawn {args.digit}"
        classifier = pipeline("image-classification", model=model)
        print(f"{source}:")
        for result in classifier(image, top_k=args.top_k):
            print(f"  {result['label']:<30} {result['score']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
