"""Object detection: transformers' DETR with an InternImage backbone, a few training steps on synthetic boxes.

    python examples/detection.py                       # tiny backbone, tiny DETR, synthetic data
    python examples/detection.py --backbone t --image-size 256 --d-model 256 --steps 20

DETR takes any registered backbone through `backbone_config` (with `use_timm_backbone=False`); it reads the last
stage (stride 32). `--backbone` is a preset ("tiny", "t", ... random init) or a `save_pretrained` folder whose
trunk weights are copied in. Needs scipy (installed with scikit-learn) for DETR's Hungarian matcher.
"""

from __future__ import annotations

import argparse

import torch
from transformers import DetrConfig, DetrForObjectDetection

from internimage_hf.training import backbone_config_and_weights


def synthetic_batch(batch_size: int, size: int, num_labels: int, generator: torch.Generator):
    """One bright rectangle per image; its class sets its brightness. Boxes are (cx, cy, w, h) in [0, 1]."""
    pixel_values = 0.3 * torch.randn(batch_size, 3, size, size, generator=generator)
    targets = []
    for b in range(batch_size):
        cls = int(torch.randint(0, num_labels, (1,), generator=generator))
        w, h = (torch.rand(2, generator=generator) * 0.4 + 0.2).tolist()
        x0, y0 = (torch.rand(2, generator=generator) * torch.tensor([1 - w, 1 - h])).tolist()
        cx, cy = x0 + w / 2, y0 + h / 2
        pixel_values[b, :, int(y0 * size) : int((y0 + h) * size), int(x0 * size) : int((x0 + w) * size)] += 1.0 + cls
        targets.append({"class_labels": torch.tensor([cls]), "boxes": torch.tensor([[cx, cy, w, h]])})
    return pixel_values, targets


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny", help="preset name or save_pretrained folder")
    parser.add_argument("--num-labels", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--d-model", type=int, default=64, help="DETR transformer width (official: 256)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    backbone_config, weights = backbone_config_and_weights(args.backbone, ["stage4"])
    config = DetrConfig(
        backbone_config=backbone_config,
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        num_labels=args.num_labels,
        d_model=args.d_model,
        encoder_layers=2,
        decoder_layers=2,
        encoder_ffn_dim=2 * args.d_model,
        decoder_ffn_dim=2 * args.d_model,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        num_queries=10,
    )
    model = DetrForObjectDetection(config).train()
    if weights is not None:  # pretrained InternImage trunk
        model.model.backbone.model.load_state_dict(weights)
    print(
        f"DETR + InternImage backbone ({type(model.model.backbone.model).__name__}): "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters"
    )

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    for step in range(1, args.steps + 1):
        pixel_values, targets = synthetic_batch(args.batch_size, args.image_size, args.num_labels, generator)
        outputs = model(pixel_values=pixel_values, labels=targets)
        outputs.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step}: loss {outputs.loss.item():.4f}")
    print(
        f"logits {tuple(outputs.logits.shape)} (batch, queries, classes + 'no object'), "
        f"pred_boxes {tuple(outputs.pred_boxes.shape)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
