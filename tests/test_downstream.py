"""InternImage as the backbone of transformers' task heads: UperNet (segmentation) and DETR (detection)."""

from __future__ import annotations

import torch
from transformers import DetrConfig, DetrForObjectDetection, UperNetConfig, UperNetForSemanticSegmentation

from internimage_hf import InternImageBackbone, InternImageConfig
from internimage_hf.training import layer_decay_param_groups, parameter_depth_ids

STAGES = ["stage1", "stage2", "stage3", "stage4"]


def backbone_config(**overrides) -> InternImageConfig:
    return InternImageConfig(**{"channels": 16, "depths": [1, 1, 1, 1], "groups": [1, 2, 4, 8], **overrides})


def tiny_upernet(num_labels: int = 5) -> UperNetForSemanticSegmentation:
    torch.manual_seed(0)
    config = UperNetConfig(
        backbone_config=backbone_config(out_features=STAGES),
        num_labels=num_labels,
        hidden_size=32,
        auxiliary_channels=16,
    )
    return UperNetForSemanticSegmentation(config)


def test_upernet_forward_backward_and_output_shape():
    model = tiny_upernet().train()
    assert isinstance(model.backbone, InternImageBackbone)
    assert model.backbone.channels == [16, 32, 64, 128]
    pixel_values = torch.randn(2, 3, 64, 96)
    labels = torch.randint(0, 5, (2, 64, 96))
    outputs = model(pixel_values=pixel_values, labels=labels)
    assert outputs.logits.shape == (2, 5, 64, 96)  # per-pixel logits at input resolution
    outputs.loss.backward()
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_upernet_trains_a_few_steps_with_layer_decay():
    model = tiny_upernet(num_labels=3).train()
    groups = layer_decay_param_groups(model, lr=2e-3, weight_decay=0.01, layer_decay=0.9)
    ids = parameter_depth_ids(model)
    assert ids["backbone.embeddings.conv1.weight"] == 3  # 4 blocks: the stem shares the first block's id
    assert ids["backbone.encoder.levels.3.layers.0.mlp.fc1.weight"] == 0
    assert all(ids[name] == 0 for name in ids if name.startswith(("decode_head.", "auxiliary_head.")))
    optimizer = torch.optim.AdamW(groups)
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(2, 3, 64, 64, generator=generator)
    labels = (pixel_values[:, 0] > 0).long() + (pixel_values[:, 1] > 1).long()  # learnable per-pixel classes
    losses = []
    for _ in range(6):
        loss = model(pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_upernet_with_internimage_backbone_saves_and_reloads(tmp_path):
    model = tiny_upernet().eval()
    model.save_pretrained(tmp_path)
    reloaded = UperNetForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert reloaded.config.backbone_config.model_type == "internimage"
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=pixel_values).logits, model(pixel_values=pixel_values).logits)


def test_detr_with_internimage_backbone_forward_backward():
    torch.manual_seed(0)
    config = DetrConfig(
        backbone_config=backbone_config(out_features=["stage4"]),
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        num_labels=3,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=5,
    )
    model = DetrForObjectDetection(config).train()
    assert isinstance(model.model.backbone.model, InternImageBackbone)
    labels = [
        {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4]])},
        {"class_labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2]])},
    ]
    outputs = model(pixel_values=torch.randn(2, 3, 64, 64), labels=labels)
    assert outputs.logits.shape == (2, 5, 4) and outputs.pred_boxes.shape == (2, 5, 4)
    outputs.loss.backward()
    assert model.model.backbone.model.embeddings.conv1.weight.grad is not None
