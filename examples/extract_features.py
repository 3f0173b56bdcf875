"""Extract multi-scale feature maps (what detection/segmentation necks consume) and a pooled image embedding.

    python examples/extract_features.py                                  # tiny random model, a random image
    python examples/extract_features.py --model path/to/internimage_t --image cat.jpg --out-features stage2 stage4

`--model`: a `save_pretrained` folder (a classifier folder works: its trunk weights are reused), a Hub id, or a
preset ("tiny", "t", "s", ... randomly initialised). Loads with `InternImageBackbone.from_pretrained` -- not
`AutoBackbone.from_pretrained`, which in transformers 5.5-5.23 queries the Hub even for a local folder.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image

from internimage_hf import InternImageBackbone, InternImageModel
from internimage_hf.training import load_model_and_processor, model_presets


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help=f"folder, Hub id or preset ({', '.join(model_presets())})")
    parser.add_argument("--image", default=None, help="image file (default: random pixels)")
    parser.add_argument("--image-size", type=int, default=None, help="resize/crop size (default: the model's)")
    parser.add_argument(
        "--out-features",
        nargs="+",
        default=["stage1", "stage2", "stage3", "stage4"],
        help="which of stem, stage1..stage4 to return",
    )
    args = parser.parse_args(argv)

    if args.image:
        image = Image.open(args.image).convert("RGB")
    else:
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8))

    torch.manual_seed(0)  # presets are randomly initialised: the same seed gives both models the same trunk
    backbone, processor = load_model_and_processor(
        InternImageBackbone, args.model, image_size=args.image_size, out_features=args.out_features
    )
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        feature_maps = backbone.eval()(pixel_values=pixel_values).feature_maps
    print(f"input {tuple(pixel_values.shape)}")
    for name, channels, features in zip(backbone.out_features, backbone.channels, feature_maps):
        stride = pixel_values.shape[-1] / features.shape[-1]
        print(f"  {name:<7} {tuple(features.shape)}  ({channels} channels, stride {stride:g})")

    # A global embedding: the trunk plus the variant's pooling head (conv head or attention pooling).
    torch.manual_seed(0)
    model, _ = load_model_and_processor(InternImageModel, args.model, image_size=args.image_size)
    with torch.inference_mode():
        embedding = model.eval()(pixel_values=pixel_values).pooler_output
    print(f"  pooled embedding {tuple(embedding.shape)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
