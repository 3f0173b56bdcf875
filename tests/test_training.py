"""Fine-tuning helpers: layer-wise LR decay groups, the Trainer that uses them, bf16, gradient checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from internimage_hf import InternImageBackbone, InternImageConfig, InternImageForImageClassification
from internimage_hf.training import (
    InternImageTrainer,
    backbone_config_and_weights,
    collate_image_classification,
    layer_decay_param_groups,
    load_model_and_processor,
    parameter_depth_ids,
)

from .conftest import rel_err

TINY = dict(channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8])


def tiny_classifier(seed: int = 0, **overrides) -> InternImageForImageClassification:
    torch.manual_seed(seed)
    return InternImageForImageClassification(InternImageConfig(**{**TINY, "num_labels": 10, **overrides}))


def randomise_offsets(model: torch.nn.Module, std: float = 0.3) -> None:
    """Offsets/masks start at zero (regular grid); random ones make sampling fractional and out of bounds."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".dcn.offset." in name or ".dcn.mask." in name:
                param.normal_(0, std)


def lr_scales(groups) -> dict[str, float]:
    return {name: g["lr_scale"] for g in groups for name in g["param_names"]}


def weight_decays(groups) -> dict[str, float]:
    return {name: g["weight_decay"] for g in groups for name in g["param_names"]}


# ---------------------------------------------------------------------------------------------- layer-wise LR decay
def test_depth_ids_follow_the_official_recipe():
    """5 blocks (depths 1,1,2,1): last block 0, first block 4; stem = first block; downsample/norm of level i =
    first block of level i+1; last level norm, conv head and classifier 0 (official `lr_decay_keywards`)."""
    ids = parameter_depth_ids(tiny_classifier())
    trunk = "internimage.encoder.levels"
    expected = {
        "internimage.embeddings.conv1.weight": 4,
        "internimage.embeddings.norm2.bias": 4,
        f"{trunk}.0.layers.0.dcn.offset.weight": 4,
        f"{trunk}.0.norm.weight": 3,
        f"{trunk}.0.downsample.conv.weight": 3,
        f"{trunk}.1.layers.0.mlp.fc1.weight": 3,
        f"{trunk}.1.downsample.norm.weight": 2,
        f"{trunk}.2.layers.0.norm1.weight": 2,
        f"{trunk}.2.layers.1.norm1.weight": 1,
        f"{trunk}.2.downsample.conv.weight": 0,
        f"{trunk}.3.layers.0.dcn.input_proj.weight": 0,
        f"{trunk}.3.norm.weight": 0,
        "internimage.pooler.conv.weight": 0,
        "classifier.weight": 0,
    }
    assert {k: ids[k] for k in expected} == expected
    assert set(ids) == {name for name, _ in tiny_classifier().named_parameters()}


def test_layer_decay_groups_lrs_weight_decay_and_dcn_multiplier():
    model = tiny_classifier(layer_scale=1e-5, post_norm=True)
    groups = layer_decay_param_groups(model, lr=1e-3, weight_decay=0.05, layer_decay=0.5, dcn_lr_mul=0.1)
    scales, decays = lr_scales(groups), weight_decays(groups)
    # Every trainable parameter exactly once.
    names = [n for g in groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert sum(len(g["params"]) for g in groups) == len(names)
    for group in groups:
        assert group["lr"] == pytest.approx(1e-3 * group["lr_scale"])
    trunk = "internimage.encoder.levels"
    assert scales["internimage.embeddings.conv1.weight"] == pytest.approx(0.5**4)
    assert scales[f"{trunk}.2.layers.1.mlp.fc2.weight"] == pytest.approx(0.5)
    assert scales["classifier.weight"] == 1.0
    assert scales[f"{trunk}.0.layers.0.dcn.offset.weight"] == pytest.approx(0.5**4 * 0.1)  # DCN LR multiplier
    assert scales[f"{trunk}.0.layers.0.dcn.mask.weight"] == pytest.approx(0.5**4)  # official: mask not multiplied
    # No weight decay on norms, biases and layer scales; decay on weight matrices and kernels.
    assert decays[f"{trunk}.0.layers.0.norm1.weight"] == 0.0
    assert decays[f"{trunk}.0.layers.0.layer_scale1"] == 0.0
    assert decays[f"{trunk}.0.layers.0.mlp.fc1.bias"] == 0.0
    assert decays["internimage.pooler.norm.weight"] == 0.0
    assert decays[f"{trunk}.0.layers.0.mlp.fc1.weight"] == 0.05
    assert decays["internimage.embeddings.conv1.weight"] == 0.05
    # A torch optimizer takes the groups as they are.
    torch.optim.AdamW(groups)


def test_dcn_multiplier_reaches_dcnv4_offset_mask_as_in_the_official_recipe():
    """FlashInternImage: the official optimizer multiplies every parameter whose name holds "offset" (offset_mask and
    the depthwise conv before it), nothing else of the DCNv4 layer."""
    from internimage_hf import InternImageConfig, InternImageForImageClassification

    config = InternImageConfig.from_preset(
        "flash_s", channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8], num_labels=3
    )
    model = InternImageForImageClassification(config)
    groups = layer_decay_param_groups(model, lr=1e-3, weight_decay=0.05, layer_decay=1.0, dcn_lr_mul=0.1)
    scales = lr_scales(groups)
    layer = "internimage.encoder.levels.1.layers.0.dcn"
    for name in ("offset_mask.weight", "offset_mask.bias", "offset_mask_dw.weight", "offset_mask_dw.bias"):
        assert scales[f"{layer}.{name}"] == pytest.approx(0.1), name
    for name in ("value_proj.weight", "output_proj.weight"):
        assert scales[f"{layer}.{name}"] == pytest.approx(1.0), name


def test_layer_decay_post_norms_follow_their_block():
    config = InternImageConfig(
        channels=16,
        depths=[1, 1, 6, 1],
        groups=[1, 2, 4, 8],
        level2_post_norm=True,
        level2_post_norm_block_ids=[2, 5],
        num_labels=3,
    )
    ids = parameter_depth_ids(InternImageForImageClassification(config))
    # blocks: level 2 block 2 is global block 4 of 9 -> id 9 - 1 - 4 = 4; block 5 -> id 1
    assert ids["internimage.encoder.levels.2.post_norms.0.weight"] == 4
    assert ids["internimage.encoder.levels.2.post_norms.1.weight"] == 1


def test_layer_decay_rejects_bad_values_and_skips_frozen_parameters():
    model = tiny_classifier()
    with pytest.raises(ValueError, match="layer_decay"):
        layer_decay_param_groups(model, 1e-3, 0.05, layer_decay=1.5)
    model.internimage.embeddings.requires_grad_(False)
    names = {n for g in layer_decay_param_groups(model, 1e-3, 0.05) for n in g["param_names"]}
    assert not any(n.startswith("internimage.embeddings.") for n in names)


def test_trainer_builds_its_optimizer_from_the_layer_decay_groups(tmp_path):
    from transformers import TrainingArguments

    model = tiny_classifier()
    args = TrainingArguments(
        output_dir=str(tmp_path), learning_rate=2e-3, weight_decay=0.1, report_to="none", use_cpu=True
    )
    trainer = InternImageTrainer(model=model, args=args, layer_decay=0.8, dcn_lr_mul=0.1)
    optimizer = trainer.create_optimizer()
    expected = layer_decay_param_groups(model, 2e-3, 0.1, layer_decay=0.8, dcn_lr_mul=0.1)
    assert [(g["lr"], g["weight_decay"], g["param_names"]) for g in optimizer.param_groups] == [
        (g["lr"], g["weight_decay"], g["param_names"]) for g in expected
    ]
    assert type(optimizer).__name__ == "AdamW"


def test_trainer_trains_a_few_steps(tmp_path):
    """InternImageTrainer end to end on random tensors: the loss of a memorisable batch falls."""
    from transformers import TrainingArguments

    torch.manual_seed(0)
    examples = [{"pixel_values": torch.randn(3, 32, 32), "labels": i % 2} for i in range(8)]
    model = tiny_classifier(num_labels=2)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        learning_rate=3e-3,
        per_device_train_batch_size=8,
        max_steps=12,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = InternImageTrainer(
        model=model, args=args, train_dataset=examples, data_collator=collate_image_classification, layer_decay=0.9
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.5 * losses[0]


def test_load_model_and_processor_replaces_a_head(tmp_path):
    model = tiny_classifier(image_size=48)
    model.save_pretrained(tmp_path)
    loaded, processor = load_model_and_processor(
        InternImageForImageClassification,
        str(tmp_path),
        ignore_mismatched_sizes=True,
        num_labels=3,
        id2label={0: "a", 1: "b", 2: "c"},
        label2id={"a": 0, "b": 1, "c": 2},
    )
    assert loaded.classifier.out_features == 3 and loaded.config.id2label[2] == "c"
    torch.testing.assert_close(loaded.internimage.embeddings.conv1.weight, model.internimage.embeddings.conv1.weight)
    assert processor.crop_size["height"] == 48  # no processor saved: the eval transform at the config's size
    backbone, _ = load_model_and_processor(InternImageBackbone, "tiny", out_features=["stage2"])
    assert backbone.out_features == ["stage2"]


def test_backbone_config_and_weights_from_a_preset_and_from_a_classifier_folder(tmp_path):
    config, weights = backbone_config_and_weights("tiny", ["stage1", "stage4"])
    assert weights is None and config.out_features == ["stage1", "stage4"]
    model = tiny_classifier()
    model.save_pretrained(tmp_path)
    config, weights = backbone_config_and_weights(str(tmp_path), ["stage2"])
    assert config.out_features == ["stage2"] and config.depths == TINY["depths"]
    backbone = InternImageBackbone(config)
    backbone.load_state_dict(weights)  # strict: exactly the trunk
    torch.testing.assert_close(
        backbone.encoder.levels[2].layers[1].dcn.input_proj.weight,
        model.internimage.encoder.levels[2].layers[1].dcn.input_proj.weight,
    )


# ---------------------------------------------------------------------------------------------- bf16
def test_bf16_autocast_and_bf16_weights_match_float32():
    model = tiny_classifier().eval()
    randomise_offsets(model)
    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(pixel_values=pixel_values, output_hidden_states=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(pixel_values=pixel_values, output_hidden_states=True)
        bf16_model = copy.deepcopy(model).to(torch.bfloat16)
        bf16 = bf16_model(pixel_values=pixel_values.to(torch.bfloat16), output_hidden_states=True)
    assert bf16.logits.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits (relative rounding 2^-9); through ~15 rounded layers the error grows to ~1e-2.
    for result in (autocast, bf16):
        assert rel_err(result.logits, reference.logits) < 2.5e-2
        for ours, ref in zip(result.hidden_states, reference.hidden_states):
            assert rel_err(ours, ref) < 2.5e-2


def test_bf16_autocast_training_step_has_finite_gradients():
    model = tiny_classifier().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(pixel_values=torch.randn(2, 3, 32, 32), labels=torch.tensor([1, 2])).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------------------------- checkpointing
def peak_memory_bytes(fn) -> int:
    """Peak of live CPU tensor memory while `fn` runs, from the profiler's allocator records.

    Every allocation and free is recorded, attributed to the op that made it (or to none); replaying them in time
    order (an op's net effect at its end) gives the live bytes over time, whose maximum is the peak.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    timeline = []
    for event in prof.events():
        if event.name == "[memory]":
            timeline.append((event.time_range.start, event.cpu_memory_usage))
        elif event.self_cpu_memory_usage:
            timeline.append((event.time_range.end, event.self_cpu_memory_usage))
    live = peak = 0
    for _, change in sorted(timeline, key=lambda item: item[0]):
        live += change
        peak = max(peak, live)
    return peak


def test_gradient_checkpointing_lowers_peak_memory_with_identical_gradients():
    model = tiny_classifier(depths=[1, 1, 4, 1]).train()
    randomise_offsets(model)
    pixel_values = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3])

    def step():
        model.zero_grad(set_to_none=True)
        model(pixel_values=pixel_values, labels=labels).loss.backward()

    step()  # warm-up: one-off allocations out of the measurement
    plain = peak_memory_bytes(step)
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    # transformers 5.23 renamed gradient_checkpointing_enable (now a deprecated alias) activation_checkpointing_enable
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert all(layer.gradient_checkpointing for level in model.internimage.encoder.levels for layer in level.layers)
    checkpointed = peak_memory_bytes(step)
    assert checkpointed < 0.85 * plain, (checkpointed, plain)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, plain_grads[name], rtol=0, atol=0, msg=name)
