"""Semantic segmentation: transformers' UperNet with an InternImage backbone, a few training steps.

    python examples/segmentation.py                                       # tiny backbone, synthetic data
    python examples/segmentation.py --backbone path/to/internimage_t --image-size 256 --steps 20

UperNet builds its backbone from `backbone_config` (through `AutoBackbone.from_config`, which `import internimage_hf`
makes aware of InternImage); the four stage outputs (strides 4-32) feed its pyramid-pooling + FPN decoder.
`--backbone` is a preset ("tiny", "t", "s", ... random init) or a `save_pretrained` folder whose trunk weights are
copied into the backbone (official segmentation fine-tunes start from the ImageNet classifier this way). The data
are synthetic: random rectangles, each class a colour, on noise; the loss visibly falls within a few steps.
The optimizer uses the official layer-wise LR decay (the decoder gets the full LR).
"""

from __future__ import annotations

import argparse

import torch
from transformers import UperNetConfig, UperNetForSemanticSegmentation

from internimage_hf.training import backbone_config_and_weights, layer_decay_param_groups

STAGES = ["stage1", "stage2", "stage3", "stage4"]


def synthetic_batch(batch_size: int, size: int, num_labels: int, generator: torch.Generator):
    """Images with random axis-aligned rectangles; the label map holds each rectangle's class (0 = background)."""
    colours = torch.linspace(-1.5, 1.5, num_labels)
    pixel_values = 0.3 * torch.randn(batch_size, 3, size, size, generator=generator)
    labels = torch.zeros(batch_size, size, size, dtype=torch.long)
    for b in range(batch_size):
        for _ in range(3):
            cls = int(torch.randint(1, num_labels, (1,), generator=generator))
            y0, x0 = torch.randint(0, size - size // 4, (2,), generator=generator).tolist()
            h, w = torch.randint(size // 8, size // 2, (2,), generator=generator).tolist()
            pixel_values[b, :, y0 : y0 + h, x0 : x0 + w] += colours[cls]
            labels[b, y0 : y0 + h, x0 : x0 + w] = cls
    return pixel_values, labels


def build_model(backbone: str, num_labels: int, hidden_size: int) -> UperNetForSemanticSegmentation:
    backbone_config, weights = backbone_config_and_weights(backbone, STAGES)
    config = UperNetConfig(
        backbone_config=backbone_config,
        num_labels=num_labels,
        hidden_size=hidden_size,
        auxiliary_channels=hidden_size // 2,
    )
    model = UperNetForSemanticSegmentation(config)
    if weights is not None:  # pretrained InternImage trunk
        model.backbone.load_state_dict(weights)
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny", help="preset name or save_pretrained folder")
    parser.add_argument("--num-labels", type=int, default=4, help="classes including background")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--layer-decay", type=float, default=0.9)
    parser.add_argument("--hidden-size", type=int, default=64, help="UperNet decoder width (official: 512)")
    parser.add_argument("--output-dir", default=None, help="save_pretrained the trained model here")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = build_model(args.backbone, args.num_labels, args.hidden_size).train()
    backbone_params = sum(p.numel() for p in model.backbone.parameters()) / 1e6
    total_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"UperNet + InternImage backbone: {total_params:.2f}M parameters ({backbone_params:.2f}M in the backbone; "
        f"stage channels {model.backbone.channels})"
    )
    optimizer = torch.optim.AdamW(layer_decay_param_groups(model, args.lr, 0.05, layer_decay=args.layer_decay))
    generator = torch.Generator().manual_seed(0)
    for step in range(1, args.steps + 1):
        pixel_values, labels = synthetic_batch(args.batch_size, args.image_size, args.num_labels, generator)
        outputs = model(pixel_values=pixel_values, labels=labels)
        outputs.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step}: loss {outputs.loss.item():.4f}")
    print(
        f"logits {tuple(outputs.logits.shape)} (batch, classes, height, width) for pixel_values "
        f"{tuple(pixel_values.shape)}"
    )

    model.eval()
    with torch.no_grad():
        pixel_values, labels = synthetic_batch(args.batch_size, args.image_size, args.num_labels, generator)
        prediction = model(pixel_values=pixel_values).logits.argmax(1)
    print(f"pixel accuracy on a new synthetic batch: {(prediction == labels).float().mean().item():.3f}")
    if args.output_dir:
        model.save_pretrained(args.output_dir)
        print(
            f"saved to {args.output_dir} (reload with UperNetForSemanticSegmentation.from_pretrained after "
            f"`import internimage_hf`)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
