"""Configuration: presets, validation, official/remote-code fields, parameter counts of every variant."""

from __future__ import annotations

import pytest
import torch

from internimage_hf import VARIANTS, InternImageConfig, InternImageForImageClassification

# Parameters of each official model with its 1k head (counted from the official code).
OFFICIAL_PARAMS = {
    "t": 29.92e6,
    "s": 50.08e6,
    "b": 97.46e6,
    "l": 223.33e6,
    "xl": 334.82e6,
    "h": 1089.6e6,
    "g": 3076.4e6,
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_presets_build_on_meta_with_official_parameter_count(variant):
    config = InternImageConfig.from_variant(variant, num_labels=1000)
    with torch.device("meta"):
        model = InternImageForImageClassification(config)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - OFFICIAL_PARAMS[variant]) / OFFICIAL_PARAMS[variant] < 0.005, count


def test_preset_fields_and_overrides():
    config = InternImageConfig.from_variant("L", drop_path_rate=0.1)
    assert config.channels == 160 and config.offset_scale == 2.0 and config.layer_scale == 1e-5
    assert config.drop_path_rate == 0.1 and config.image_size == 384
    h = InternImageConfig.from_variant("internimage-h")
    assert h.use_clip_projector and h.center_feature_scale and h.dw_kernel_size == 5 and h.res_post_norm
    assert h.pooled_size == 768 and InternImageConfig.from_variant("t").pooled_size == 768


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(channels=10), "groups"),
        (dict(depths=[1, 1, 1]), "depths"),
        (dict(groups=[4, 8, 16]), "groups"),
        (dict(dw_kernel_size=4), "dw_kernel_size"),
        (dict(offset_scale=0), "offset_scale"),
        (dict(level2_post_norm=True, level2_post_norm_block_ids=[99]), "level2_post_norm_block_ids"),
        (dict(level2_post_norm=True), "level2_post_norm_block_ids"),
        (dict(drop_path_rate=1.5), "drop_path_rate"),
        (dict(act_layer="ReLU"), "act_layer"),
    ],
)
def test_invalid_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        InternImageConfig(**kwargs)


def test_unknown_variant():
    with pytest.raises(ValueError, match="Unknown InternImage variant"):
        InternImageConfig.from_variant("xxl")


def test_official_and_remote_code_fields_are_accepted():
    config = InternImageConfig(
        core_op="DCNv3",
        num_classes=7,
        with_cp=False,
        drop_path_type="linear",
        norm_layer="LN",
        act_layer="GELU",
        dw_kernel_size=None,
    )
    assert config.num_labels == 7 and config.dw_kernel_size == 3
    assert "num_classes" not in config.to_dict() and config.to_dict()["core_op"] == "DCNv3"  # a field since DCNv4


def test_backbone_fields_round_trip(tmp_path):
    config = InternImageConfig(out_features=["stage2", "stage4"])
    assert config.stage_names == ["stem", "stage1", "stage2", "stage3", "stage4"]
    assert config.out_indices == [2, 4]
    config.save_pretrained(tmp_path)
    again = InternImageConfig.from_pretrained(tmp_path)
    assert again.out_features == ["stage2", "stage4"] and again.depths == config.depths
