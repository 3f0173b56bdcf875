"""InternImageConfig rejects bad values with a ValueError that names the field, and accepts every good one.

Each bad configuration is one row: the keyword arguments and the field its error must name. Our own checks raise
"InternImageConfig.<field>: ..."; the backbone fields' (out_features, out_indices) checks are transformers' own and
name the field in their text.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from internimage_hf import VARIANTS, InternImageConfig
from internimage_hf.configuration_internimage import FLASH_VARIANTS

from .conftest import FIXTURES, FLASH_FIXTURES, FLASH_MODEL_CASES, MODEL_CASES

NAN, INF = math.nan, math.inf
TRANSFORMERS_FIELDS = {"out_features", "out_indices"}  # checked by transformers' BackboneConfigMixin
SMALL = dict(channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8])  # a valid small config to vary


def assert_names_field(error: ValueError, field: str) -> None:
    message = str(error)
    if field in TRANSFORMERS_FIELDS:
        assert field in message, message
    else:
        assert message.startswith(f"InternImageConfig.{field}: "), message


# (keyword arguments, field the error must name)
BAD = [
    # ---- integers must be integers (no truncation of floats, no strings, no bools, no None)
    (dict(channels=16.7), "channels"),
    (dict(channels=64.0), "channels"),
    (dict(channels="64"), "channels"),
    (dict(channels=True), "channels"),
    (dict(channels=None), "channels"),
    (dict(kernel_size=3.0), "kernel_size"),
    (dict(kernel_size="3"), "kernel_size"),
    (dict(dw_kernel_size=5.0), "dw_kernel_size"),
    (dict(dw_kernel_size="5"), "dw_kernel_size"),
    (dict(projector_dim=1024.5), "projector_dim"),
    (dict(projector_out_dim="768"), "projector_out_dim"),
    (dict(projector_num_heads=16.0), "projector_num_heads"),
    (dict(num_channels=3.0), "num_channels"),
    (dict(num_channels=False), "num_channels"),
    (dict(image_size="224"), "image_size"),
    (dict(image_size=224.0), "image_size"),
    (dict(image_size=[224, 224]), "image_size"),
    # ---- integer lists
    (dict(depths=[1.5, 1, 2, 1]), "depths"),
    (dict(depths=[1, 1, 2.0, 1]), "depths"),
    (dict(depths=[1, 1, True, 1]), "depths"),
    (dict(depths="1121"), "depths"),
    (dict(depths=4), "depths"),
    (dict(depths=None), "depths"),
    (dict(depths={"a": 1}), "depths"),
    (dict(groups=[4.0, 8, 16, 32]), "groups"),
    (dict(groups=["4", 8, 16, 32]), "groups"),
    (dict(groups=4), "groups"),
    (dict(level2_post_norm=True, level2_post_norm_block_ids=[1.0]), "level2_post_norm_block_ids"),
    (dict(level2_post_norm=True, level2_post_norm_block_ids="5"), "level2_post_norm_block_ids"),
    (dict(level2_post_norm_block_ids=5), "level2_post_norm_block_ids"),
    # ---- booleans must be bools ("false" is not falsy here, 0/1 are not bools)
    (dict(post_norm="false"), "post_norm"),
    (dict(post_norm="true"), "post_norm"),
    (dict(post_norm=1), "post_norm"),
    (dict(res_post_norm="False"), "res_post_norm"),
    (dict(level2_post_norm=0), "level2_post_norm"),
    (dict(center_feature_scale=None), "center_feature_scale"),
    (dict(use_clip_projector="yes"), "use_clip_projector"),
    (dict(remove_center=1), "remove_center"),
    (dict(remove_center=1.0), "remove_center"),
    (dict(recompute_sampling_parameters="False"), "recompute_sampling_parameters"),
    # ---- floats: numbers, finite, in range
    (dict(mlp_ratio="4"), "mlp_ratio"),
    (dict(mlp_ratio=None), "mlp_ratio"),
    (dict(mlp_ratio=INF), "mlp_ratio"),
    (dict(mlp_ratio=NAN), "mlp_ratio"),
    (dict(mlp_ratio=0), "mlp_ratio"),
    (dict(mlp_ratio=-4.0), "mlp_ratio"),
    (dict(mlp_ratio=0.01), "mlp_ratio"),  # int(64 * 0.01) == 0 hidden units
    (dict(SMALL, mlp_ratio=0.05), "mlp_ratio"),  # int(16 * 0.05) == 0
    (dict(offset_scale=NAN), "offset_scale"),
    (dict(offset_scale=INF), "offset_scale"),
    (dict(offset_scale=-INF), "offset_scale"),
    (dict(offset_scale=0), "offset_scale"),
    (dict(offset_scale=-1.0), "offset_scale"),
    (dict(offset_scale="1.0"), "offset_scale"),
    (dict(offset_scale=True), "offset_scale"),
    (dict(layer_scale=0.0), "layer_scale"),
    (dict(layer_scale=-1e-5), "layer_scale"),
    (dict(layer_scale=NAN), "layer_scale"),
    (dict(layer_scale=INF), "layer_scale"),
    (dict(layer_scale="1e-5"), "layer_scale"),
    (dict(cls_scale=0), "cls_scale"),
    (dict(cls_scale=-1.5), "cls_scale"),
    (dict(cls_scale=INF), "cls_scale"),
    (dict(cls_scale=NAN), "cls_scale"),
    (dict(cls_scale=1e-9), "cls_scale"),  # int(512 * 1e-9) == 0 head channels
    (dict(drop_rate=1.0), "drop_rate"),
    (dict(drop_rate=-0.1), "drop_rate"),
    (dict(drop_rate=NAN), "drop_rate"),
    (dict(drop_path_rate=1.5), "drop_path_rate"),
    (dict(drop_path_rate=-0.1), "drop_path_rate"),
    (dict(drop_path_rate=INF), "drop_path_rate"),
    (dict(drop_path_rate=True), "drop_path_rate"),
    (dict(layer_norm_eps=0), "layer_norm_eps"),
    (dict(layer_norm_eps=-1e-6), "layer_norm_eps"),
    (dict(layer_norm_eps=INF), "layer_norm_eps"),
    (dict(layer_norm_eps=NAN), "layer_norm_eps"),
    (dict(layer_norm_eps="1e-6"), "layer_norm_eps"),
    (dict(layer_norm_eps=None), "layer_norm_eps"),
    (dict(initializer_range=-0.02), "initializer_range"),
    (dict(initializer_range=NAN), "initializer_range"),
    (dict(initializer_range=INF), "initializer_range"),
    # ---- integer ranges and what the architecture needs
    (dict(channels=0), "channels"),
    (dict(channels=1, groups=[1, 1, 1, 1]), "channels"),  # the stem's first conv would have 0 outputs
    (dict(channels=-64), "channels"),
    (dict(channels=10), "groups"),  # 10 channels, groups[0] = 4
    (dict(depths=[1, 1, 1]), "depths"),
    (dict(depths=[1, 1, 1, 1, 1]), "depths"),
    (dict(depths=[]), "depths"),
    (dict(depths=[0, 1, 1, 1]), "depths"),
    (dict(depths=[1, 1, -2, 1]), "depths"),
    (dict(groups=[4, 8, 16]), "groups"),
    (dict(groups=[0, 8, 16, 32]), "groups"),
    (dict(groups=[3, 8, 16, 32]), "groups"),  # 64 % 3
    (dict(groups=[4, 8, 16, 48]), "groups"),  # 512 % 48
    (dict(kernel_size=0), "kernel_size"),
    (dict(kernel_size=4), "kernel_size"),
    (dict(kernel_size=-3), "kernel_size"),
    (dict(dw_kernel_size=4), "dw_kernel_size"),
    (dict(dw_kernel_size=0), "dw_kernel_size"),
    (dict(kernel_size=1, remove_center=True), "remove_center"),  # zero sampling points
    (dict(kernel_size=1, dw_kernel_size=3, remove_center=True), "remove_center"),
    (dict(projector_dim=0), "projector_dim"),
    (dict(projector_dim=-1024), "projector_dim"),
    (dict(projector_out_dim=0), "projector_out_dim"),
    (dict(projector_num_heads=0), "projector_num_heads"),
    (dict(projector_num_heads=-16), "projector_num_heads"),
    (dict(projector_num_heads=7), "projector_num_heads"),  # does not divide 1024
    (dict(projector_num_heads=2048), "projector_num_heads"),
    (dict(use_clip_projector=True, projector_dim=100, projector_num_heads=16), "projector_num_heads"),
    (dict(num_channels=0), "num_channels"),
    (dict(image_size=0), "image_size"),
    (dict(image_size=-224), "image_size"),
    (dict(image_size=16), "image_size"),  # below the model's output stride: it rejects such images
    (dict(use_clip_projector=True, image_size=300), "image_size"),  # H/G need multiples of 32
    # ---- level-2 post norms (InternImage-H/G)
    (dict(level2_post_norm=True), "level2_post_norm_block_ids"),
    (dict(level2_post_norm=True, level2_post_norm_block_ids=[]), "level2_post_norm_block_ids"),
    (dict(level2_post_norm=True, level2_post_norm_block_ids=[99]), "level2_post_norm_block_ids"),
    (dict(level2_post_norm=True, level2_post_norm_block_ids=[-1]), "level2_post_norm_block_ids"),
    (dict(level2_post_norm=True, level2_post_norm_block_ids=[1, 1]), "level2_post_norm_block_ids"),
    (dict(SMALL, level2_post_norm=True, level2_post_norm_block_ids=[2]), "level2_post_norm_block_ids"),
    # ---- activation: the model's GELUs are fixed (exact erf GELU, as in the official code)
    (dict(hidden_act="relu"), "hidden_act"),
    (dict(hidden_act="gelu_new"), "hidden_act"),
    (dict(hidden_act="GELU"), "hidden_act"),
    (dict(hidden_act="swish"), "hidden_act"),
    (dict(hidden_act=None), "hidden_act"),
    (dict(hidden_act=1), "hidden_act"),
    # ---- official constructor keys the port only accepts with their one supported value
    (dict(act_layer="ReLU"), "act_layer"),
    (dict(norm_layer="BN"), "norm_layer"),
    (dict(drop_path_type="constant"), "drop_path_type"),
    # ---- head size
    (dict(num_classes="7"), "num_classes"),
    (dict(num_classes=7.0), "num_classes"),
    (dict(num_classes=-1), "num_classes"),
    (dict(num_classes=True), "num_classes"),
    (dict(num_labels=2.5), "num_labels"),
    (dict(num_labels=-3), "num_labels"),
    # ---- backbone outputs (transformers' checks)
    (dict(out_features=["stage9"]), "out_features"),
    (dict(out_indices=[7]), "out_indices"),
    # ---- core op and the FlashInternImage (DCNv4) fields
    (dict(core_op="DCNv5"), "core_op"),
    (dict(core_op="dcn"), "core_op"),
    (dict(core_op=None), "core_op"),
    (dict(core_op=4), "core_op"),
    (dict(core_op=["DCNv4"]), "core_op"),
    (dict(dcn_output_bias="false"), "dcn_output_bias"),
    (dict(dcn_output_bias=0), "dcn_output_bias"),
    (dict(mlp_fc2_bias=1), "mlp_fc2_bias"),
    (dict(core_op="DCNv4", mlp_fc2_bias="yes"), "mlp_fc2_bias"),
    (dict(core_op="DCNv4", kernel_size=5), "kernel_size"),  # FlashInternImage's DCNv4 is always 3x3
    (dict(core_op="DCNv4", kernel_size=1), "kernel_size"),
    (dict(core_op="DCNv4", remove_center=True), "remove_center"),  # cannot be set in FlashInternImage
    (dict(core_op="DCNv4", dw_kernel_size=2), "dw_kernel_size"),
    (dict(core_op="DCNv4", dw_kernel_size=-3), "dw_kernel_size"),
    (dict(core_op="DCNv4", dw_kernel_size=3.0), "dw_kernel_size"),
    (dict(core_op="DCNv4", dw_kernel_size=False), "dw_kernel_size"),
    (dict(core_op="DCNv4", channels=10), "groups"),
]


@pytest.mark.parametrize("kwargs, field", BAD, ids=[f"{i:03d}-{field}" for i, (_, field) in enumerate(BAD)])
def test_bad_config_is_rejected_naming_the_field(kwargs, field):
    with pytest.raises(ValueError) as error:
        InternImageConfig(**kwargs)
    assert_names_field(error.value, field)


# Garbage straight from a config.json (what `from_pretrained` reads): the same checks, through from_dict.
BAD_DICTS = [
    ({"channels": "abc"}, "channels"),
    ({"channels": None}, "channels"),
    ({"channels": [64]}, "channels"),
    ({"depths": "4,4,18,4"}, "depths"),
    ({"depths": [4, 4, None, 4]}, "depths"),
    ({"groups": None}, "groups"),
    ({"post_norm": "false"}, "post_norm"),
    ({"post_norm": None}, "post_norm"),
    ({"mlp_ratio": "four"}, "mlp_ratio"),
    ({"offset_scale": {"value": 1}}, "offset_scale"),
    ({"layer_norm_eps": [1e-6]}, "layer_norm_eps"),
    ({"hidden_act": ["gelu"]}, "hidden_act"),
    ({"image_size": None}, "image_size"),
    ({"kernel_size": None}, "kernel_size"),
    ({"num_classes": "seven"}, "num_classes"),
    ({"level2_post_norm": True, "level2_post_norm_block_ids": {"1": 2}}, "level2_post_norm_block_ids"),
    ({"core_op": {"op": "DCNv4"}}, "core_op"),
    ({"core_op": "DCNv4", "dcn_output_bias": "true"}, "dcn_output_bias"),
    ({"core_op": "DCNv4", "kernel_size": 5}, "kernel_size"),
]


@pytest.mark.parametrize("data, field", BAD_DICTS, ids=[f"{i:02d}-{f}" for i, (_, f) in enumerate(BAD_DICTS)])
def test_from_dict_garbage_names_the_field(data, field):
    with pytest.raises(ValueError) as error:
        InternImageConfig.from_dict(dict(model_type="internimage", **data))
    assert_names_field(error.value, field)


# Assignment after construction (and `from_pretrained(path, field=value)` overrides, which assign) is checked too.
BAD_ASSIGNMENTS = [
    ("channels", 16.7),
    ("depths", [1.5, 1, 1, 1]),
    ("post_norm", "false"),
    ("offset_scale", NAN),
    ("layer_norm_eps", 0.0),
    ("hidden_act", "relu"),
    ("image_size", 0),
    ("kernel_size", 2),
    ("core_op", "DCNv9"),
    ("dcn_output_bias", "no"),
    ("mlp_fc2_bias", 0),
]


@pytest.mark.parametrize("field, value", BAD_ASSIGNMENTS, ids=[f for f, _ in BAD_ASSIGNMENTS])
def test_bad_assignment_is_rejected(field, value):
    config = InternImageConfig()
    before = getattr(config, field)
    with pytest.raises(ValueError) as error:
        setattr(config, field, value)
    assert_names_field(error.value, field)
    assert getattr(config, field) == before


def test_bad_override_in_from_pretrained_names_the_field(tmp_path):
    InternImageConfig(**SMALL).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as error:
        InternImageConfig.from_pretrained(tmp_path, post_norm="yes")
    assert_names_field(error.value, "post_norm")


def test_inconsistent_assignments_are_caught_before_saving(tmp_path):
    """Checks across fields run in __init__ and in validate(), which save_pretrained calls."""
    config = InternImageConfig()
    config.channels = 10  # a valid int on its own, but not divisible by groups[0] = 4
    with pytest.raises(ValueError) as error:
        config.save_pretrained(tmp_path)
    assert_names_field(error.value, "groups")
    assert not (tmp_path / "config.json").exists()


# ---------------------------------------------------------------------------------------------- good configurations
GOOD = [
    dict(),
    dict(SMALL),
    dict(SMALL, mlp_ratio=4),  # an int where a float is expected is fine
    dict(SMALL, mlp_ratio=0.0625),  # int(16 * 0.0625) == 1 hidden unit
    dict(channels=2, depths=[1, 1, 1, 1], groups=[1, 1, 1, 1]),
    dict(channels=3, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8]),  # odd channels: the stem has 1 then 3
    dict(depths=(4, 4, 18, 4), groups=(4, 8, 16, 32)),  # tuples
    dict(channels=np.int64(16), depths=np.array([1, 1, 2, 1]).tolist(), groups=[np.int32(1), 2, 4, 8]),
    dict(SMALL, mlp_ratio=np.float32(4.0), post_norm=np.bool_(True), layer_scale=np.float64(1e-5)),
    dict(layer_scale=None, dw_kernel_size=None),
    dict(kernel_size=5, remove_center=True),
    dict(kernel_size=3, remove_center=True),
    dict(kernel_size=1),  # a 1x1 kernel keeps its one (centre) point
    dict(dw_kernel_size=7),
    dict(drop_rate=0.0, drop_path_rate=0.999),
    dict(initializer_range=0.0),
    dict(offset_scale=1e-3, cls_scale=0.5),
    dict(num_classes=0),
    dict(num_classes=1000),
    dict(num_labels=0),
    dict(image_size=32),
    dict(use_clip_projector=True, image_size=224),
    dict(use_clip_projector=True, projector_dim=64, projector_num_heads=1, projector_out_dim=8),
    dict(projector_num_heads=1024),
    dict(SMALL, level2_post_norm=True, level2_post_norm_block_ids=[0, 1]),
    dict(level2_post_norm=False, level2_post_norm_block_ids=[99]),  # ignored without level2_post_norm
    dict(hidden_act="gelu"),
    dict(core_op="DCNv3", with_cp=True, act_layer="GELU", norm_layer="LN", drop_path_type="linear"),
    dict(core_op="DCNv3_pytorch", with_cp=None),
    dict(out_features=["stage1", "stage2", "stage3", "stage4"]),
    dict(out_indices=[0, 4]),
    # ---- FlashInternImage (DCNv4)
    dict(core_op="DCNv4"),
    dict(SMALL, core_op="DCNv4"),
    dict(core_op="dcnv4", dw_kernel_size=0),  # 0 = no depthwise conv, like None
    dict(core_op="DCNv4", dw_kernel_size=5, dcn_output_bias=True, mlp_fc2_bias=True),
    dict(core_op="DCNv4", post_norm=True, layer_scale=1e-5, center_feature_scale=True),  # adds level norms only
    dict(core_op="DCNv4", kernel_size=3, remove_center=False, recompute_sampling_parameters=False),
    dict(core_op="DCNv3", dcn_output_bias=False, mlp_fc2_bias=False),
]


@pytest.mark.parametrize("kwargs", GOOD, ids=[f"{i:02d}" for i in range(len(GOOD))])
def test_good_config_is_accepted_and_round_trips(kwargs, tmp_path):
    config = InternImageConfig(**kwargs)
    assert isinstance(config.channels, int) and all(type(d) is int for d in config.depths + config.groups)
    assert type(config.post_norm) is bool and type(config.mlp_ratio) is float
    config.save_pretrained(tmp_path)
    again = InternImageConfig.from_pretrained(tmp_path)
    assert again.to_dict() == config.to_dict()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("override", [{}, dict(drop_path_rate=0.4, num_labels=1000)])
def test_official_variants_are_accepted(variant, override):
    InternImageConfig.from_variant(variant, **override)


@pytest.mark.parametrize("case", MODEL_CASES)
def test_official_constructor_configs_are_accepted(case):
    """The keyword arguments the official InternImage(...) constructor got for each fixture."""
    kwargs = json.loads((FIXTURES / case / "official_config.json").read_text())
    config = InternImageConfig(**kwargs)
    assert config.channels == kwargs["channels"] and config.depths == kwargs["depths"]
    assert config.num_labels == kwargs["num_classes"]


@pytest.mark.parametrize("variant", list(FLASH_VARIANTS))
def test_flash_variants_are_accepted(variant):
    config = InternImageConfig.from_variant(variant, drop_path_rate=0.1, num_labels=1000)
    assert config.core_op == "DCNv4" and config.kernel_size == 3 and not config.remove_center
    assert config.image_size == FLASH_VARIANTS[variant]["eval_size"]


@pytest.mark.parametrize("case", FLASH_MODEL_CASES)
def test_official_flash_constructor_configs_are_accepted(case):
    """The keyword arguments the official FlashInternImage(...) constructor got for each flash fixture."""
    kwargs = json.loads((FLASH_FIXTURES / case / "official_config.json").read_text())
    config = InternImageConfig(**kwargs)
    assert config.core_op == "DCNv4" and config.num_labels == kwargs["num_classes"]
    for field in ("dw_kernel_size", "dcn_output_bias", "mlp_fc2_bias", "offset_scale", "layer_scale", "post_norm"):
        assert getattr(config, field) == kwargs[field], field


@pytest.mark.parametrize(
    "core_op, dw_kernel_size, bias",
    [("DCNv3", 3, True), ("DCNv3_pytorch", 3, True), ("DCNv4", None, False)],
)
def test_none_defaults_follow_the_core_op(core_op, dw_kernel_size, bias, tmp_path):
    """None means the official constructor's default for the chosen core op, and is saved resolved."""
    config = InternImageConfig(core_op=core_op, dw_kernel_size=None, dcn_output_bias=None, mlp_fc2_bias=None)
    assert config.dw_kernel_size == dw_kernel_size
    assert config.dcn_output_bias is bias and config.mlp_fc2_bias is bias
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["dw_kernel_size"] == dw_kernel_size and saved["dcn_output_bias"] is bias
    assert InternImageConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()


def test_switching_a_flash_config_to_dcnv3_is_caught_before_saving(tmp_path):
    """DCNv4's "no depthwise conv" (None) has no DCNv3 meaning: validate() names the field."""
    config = InternImageConfig(core_op="DCNv4")
    config.core_op = "DCNv3"
    with pytest.raises(ValueError) as error:
        config.save_pretrained(tmp_path)
    assert_names_field(error.value, "dw_kernel_size")
    assert not (tmp_path / "config.json").exists()


def test_opengvlab_remote_code_config_is_accepted():
    """OpenGVLab's Hub config.json (num_classes, core_op "DCNv3", dw_kernel_size null, auto_map, ...)."""
    config = InternImageConfig.from_pretrained(FIXTURES / "tiny_l_remote_code_repo")
    assert config.num_labels == 7 and config.dw_kernel_size == config.kernel_size == 3
    assert config.layer_scale == 1e-5 and config.post_norm is True
