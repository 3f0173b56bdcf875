"""InternImage configuration: every official constructor field, transformers conventions, and variant presets."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
from transformers import PretrainedConfig
from transformers.backbone_utils import BackboneConfigMixin

# Official architecture of each released variant (the official configs). `eval_size` is the resolution its
# released 1k weights were evaluated at; `train_drop_path_rate` the official training value (models load with
# 0.0, for inference).
VARIANTS: dict[str, dict[str, Any]] = {
    "t": dict(
        channels=64,
        depths=[4, 4, 18, 4],
        groups=[4, 8, 16, 32],
        offset_scale=1.0,
        layer_scale=None,
        post_norm=False,
        eval_size=224,
        train_drop_path_rate=0.1,
    ),
    "s": dict(
        channels=80,
        depths=[4, 4, 21, 4],
        groups=[5, 10, 20, 40],
        offset_scale=1.0,
        layer_scale=1e-5,
        post_norm=True,
        eval_size=224,
        train_drop_path_rate=0.4,
    ),
    "b": dict(
        channels=112,
        depths=[4, 4, 21, 4],
        groups=[7, 14, 28, 56],
        offset_scale=1.0,
        layer_scale=1e-5,
        post_norm=True,
        eval_size=224,
        train_drop_path_rate=0.5,
    ),
    "l": dict(
        channels=160,
        depths=[5, 5, 22, 5],
        groups=[10, 20, 40, 80],
        offset_scale=2.0,
        layer_scale=1e-5,
        post_norm=True,
        eval_size=384,
        train_drop_path_rate=0.1,
    ),
    "xl": dict(
        channels=192,
        depths=[5, 5, 24, 5],
        groups=[12, 24, 48, 96],
        offset_scale=2.0,
        layer_scale=1e-5,
        post_norm=True,
        eval_size=384,
        train_drop_path_rate=0.2,
    ),
    "h": dict(
        channels=320,
        depths=[6, 6, 32, 6],
        groups=[10, 20, 40, 80],
        offset_scale=1.0,
        layer_scale=None,
        post_norm=False,
        res_post_norm=True,
        dw_kernel_size=5,
        level2_post_norm=True,
        level2_post_norm_block_ids=[5, 11, 17, 23, 29],
        center_feature_scale=True,
        use_clip_projector=True,
        eval_size=640,
        train_drop_path_rate=0.2,
    ),
    "g": dict(
        channels=512,
        depths=[2, 2, 48, 4],
        groups=[16, 32, 64, 128],
        offset_scale=1.0,
        layer_scale=None,
        post_norm=True,
        dw_kernel_size=5,
        level2_post_norm=True,
        level2_post_norm_block_ids=[5, 11, 17, 23, 29, 35, 41, 47],
        center_feature_scale=True,
        use_clip_projector=True,
        eval_size=512,
        train_drop_path_rate=0.4,
    ),
}

# FlashInternImage: the InternImage architecture with DCNv4 as its core op (OpenGVLab/DCNv4,
# `classification/configs/flash_intern_image_*.yaml`). Same keys as `VARIANTS`; the preset names are "flash_t", ...
FLASH_VARIANTS: dict[str, dict[str, Any]] = {
    "flash_t": dict(
        core_op="DCNv4",
        channels=64,
        depths=[4, 4, 18, 4],
        groups=[4, 8, 16, 32],
        offset_scale=1.0,
        layer_scale=None,
        post_norm=False,
        dw_kernel_size=None,
        dcn_output_bias=False,
        mlp_fc2_bias=False,
        eval_size=224,
        train_drop_path_rate=0.1,
    ),
    "flash_s": dict(
        core_op="DCNv4",
        channels=80,
        depths=[4, 4, 21, 4],
        groups=[5, 10, 20, 40],
        offset_scale=1.0,
        layer_scale=1e-5,
        post_norm=True,
        dw_kernel_size=3,
        dcn_output_bias=False,
        mlp_fc2_bias=False,
        eval_size=224,
        train_drop_path_rate=0.4,
    ),
    "flash_b": dict(
        core_op="DCNv4",
        channels=112,
        depths=[4, 4, 21, 4],
        groups=[7, 14, 28, 56],
        offset_scale=0.5,
        layer_scale=1e-5,
        post_norm=True,
        dw_kernel_size=3,
        dcn_output_bias=False,
        mlp_fc2_bias=False,
        eval_size=224,
        train_drop_path_rate=0.5,
    ),
    "flash_l": dict(
        core_op="DCNv4",
        channels=160,
        depths=[5, 5, 22, 5],
        groups=[10, 20, 40, 80],
        offset_scale=2.0,
        layer_scale=1e-5,
        post_norm=True,
        dw_kernel_size=3,
        dcn_output_bias=True,
        mlp_fc2_bias=True,
        eval_size=384,
        train_drop_path_rate=0.1,
    ),
}


def official_variant(key: str) -> dict[str, Any] | None:
    """The `VARIANTS` or `FLASH_VARIANTS` entry of a normalised key (looked up on each call), or None."""
    return VARIANTS.get(key, FLASH_VARIANTS.get(key))


def official_variant_names() -> list[str]:
    """Every official variant key: InternImage (DCNv3) first, then FlashInternImage (DCNv4)."""
    return [*VARIANTS, *FLASH_VARIANTS]


# The one small model that is not an official variant: the demo trains it from scratch, training and the examples build
# it as the preset "tiny" (0.4M parameters, the block design of InternImage-T, 32x32 inputs).
TINY: dict[str, Any] = {"channels": 16, "depths": [1, 1, 2, 1], "groups": [1, 2, 4, 8], "image_size": 32}

# Names `InternImageConfig.from_preset` builds a config from: "tiny" and the official variants.
PRESETS: tuple[str, ...] = ("tiny", *VARIANTS, *FLASH_VARIANTS)

# Spellings of the FlashInternImage prefix (display name, official file names, preset keys), longest first.
_FLASH_PREFIXES = ("flashinternimage", "flash_intern_image", "flash-intern-image", "flash_internimage", "flash")


def variant_key(name: str) -> str:
    """The key of a variant or preset name: "InternImage-T", "internimage_t", "T" -> "t"; "FlashInternImage-T",
    "flash_intern_image_t", "flash-t" -> "flash_t" (not checked against the variants). The one place such names are
    normalised (configuration, training, conversion)."""
    key = str(name).lower()
    for prefix in _FLASH_PREFIXES:
        if key.startswith(prefix):
            return "flash_" + key.removeprefix(prefix).lstrip("-_")
    return key.removeprefix("internimage-").removeprefix("internimage_")


# core_op values: the official InternImage's ("DCNv3", and "DCNv3_pytorch", its pure-PyTorch build of the same op)
# and FlashInternImage's ("DCNv4"), normalised to "DCNv3" or "DCNv4".
CORE_OPS = {"dcnv3": "DCNv3", "dcnv3_pytorch": "DCNv3", "dcnv4": "DCNv4"}

_IGNORED_OFFICIAL_KEYS = {
    "with_cp": None,
    "drop_path_type": "linear",
    "act_layer": "GELU",
    "norm_layer": "LN",
}

# Activations the model implements: every GELU in InternImage is the exact (erf) nn.GELU, as in the official code.
SUPPORTED_ACTIVATIONS = ("gelu",)

# ---------------------------------------------------------------------------------------------- field checks
# Each field is checked, and normalised (lists, Python int/float/bool), whenever it is set: in __init__, by
# `from_pretrained(..., field=value)` overrides and by plain assignment. Checks that involve several fields run in
# __init__ and in `validate()` (which `save_pretrained` calls).
_BOOL_FIELDS = (
    "post_norm",
    "res_post_norm",
    "level2_post_norm",
    "center_feature_scale",
    "use_clip_projector",
    "remove_center",
    "recompute_sampling_parameters",
    "dcn_output_bias",
    "mlp_fc2_bias",
)
# Bias fields whose None means the official default of the config's core_op: InternImage (DCNv3) always has these
# biases, FlashInternImage's constructor defaults them to False.
_CORE_OP_BIAS_DEFAULTS = {
    "dcn_output_bias": {"DCNv3": True, "DCNv4": False},
    "mlp_fc2_bias": {"DCNv3": True, "DCNv4": False},
}
# field -> smallest value
_INT_FIELDS = {
    "channels": 2,
    "kernel_size": 1,
    "dw_kernel_size": 1,
    "projector_dim": 1,
    "projector_out_dim": 1,
    "projector_num_heads": 1,
    "num_channels": 1,
    "image_size": 32,
}
_ODD_FIELDS = ("kernel_size", "dw_kernel_size")
_INT_LIST_FIELDS = {"depths": 1, "groups": 1}
# field -> (lower bound, lower bound allowed, upper bound or None, None allowed)
_FLOAT_FIELDS = {
    "mlp_ratio": (0.0, False, None, False),
    "offset_scale": (0.0, False, None, False),
    "layer_scale": (0.0, False, None, True),
    "cls_scale": (0.0, False, None, False),
    "drop_rate": (0.0, True, 1.0, False),
    "drop_path_rate": (0.0, True, 1.0, False),
    "layer_norm_eps": (0.0, False, None, False),
    "initializer_range": (0.0, True, None, False),
}
_WHY = {
    "channels": "the stem's first convolution has channels // 2 outputs",
    "image_size": "the model's output stride; it rejects smaller images",
}


def _fail(field: str, message: str):
    raise ValueError(f"InternImageConfig.{field}: {message}")


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _check_int(field: str, value: Any, minimum: int) -> int:
    if not _is_int(value):
        _fail(field, f"must be an integer, got {_describe(value)}")
    if value < minimum:
        why = f" ({_WHY[field]})" if field in _WHY else ""
        _fail(field, f"must be at least {minimum}{why}, got {value}")
    return int(value)


def _check_int_list(field: str, value: Any, minimum: int) -> list[int]:
    if not isinstance(value, (list, tuple)):
        _fail(field, f"must be a list of integers, got {_describe(value)}")
    for index, item in enumerate(value):
        if not _is_int(item):
            _fail(field, f"must be a list of integers; entry {index} is {_describe(item)}")
        if item < minimum:
            _fail(field, f"entries must be at least {minimum}; entry {index} is {item}")
    return [int(item) for item in value]


def _check_field(field: str, value: Any) -> Any:
    """The checked, normalised value of one field (ValueError naming the field otherwise)."""
    if field in _BOOL_FIELDS:
        if not isinstance(value, (bool, np.bool_)):
            _fail(field, f"must be true or false, got {_describe(value)}")
        return bool(value)
    if field in _INT_FIELDS:
        value = _check_int(field, value, _INT_FIELDS[field])
        if field in _ODD_FIELDS and value % 2 == 0:
            _fail(field, f"must be a positive odd number, got {value}")
        return value
    if field in _INT_LIST_FIELDS:
        return _check_int_list(field, value, _INT_LIST_FIELDS[field])
    if field in _FLOAT_FIELDS:
        low, low_ok, high, none_ok = _FLOAT_FIELDS[field]
        if value is None and none_ok:
            return None
        if not _is_real(value):
            kind = "a number or null" if none_ok else "a number"
            _fail(field, f"must be {kind}, got {_describe(value)}")
        value = float(value)
        if not math.isfinite(value):
            _fail(field, f"must be finite, got {value}")
        if value < low or (value == low and not low_ok) or (high is not None and value >= high):
            interval = f"{'[' if low_ok else '('}{low:g}, {'inf)' if high is None else f'{high:g})'}"
            _fail(field, f"must be in {interval}, got {value}")
        return value
    if field == "level2_post_norm_block_ids":
        return None if value is None else _check_int_list(field, value, 0)
    if field == "core_op":
        if not isinstance(value, str) or value.lower() not in CORE_OPS:
            _fail(field, f"must be 'DCNv3' (InternImage) or 'DCNv4' (FlashInternImage), got {_describe(value)}")
        return CORE_OPS[value.lower()]
    if field == "hidden_act":
        if value not in SUPPORTED_ACTIVATIONS:
            _fail(
                field,
                f"must be one of {', '.join(map(repr, SUPPORTED_ACTIVATIONS))} (the model's GELUs are "
                f"fixed, as in the official code), got {_describe(value)}",
            )
        return value
    return value


_CHECKED_FIELDS = frozenset(
    (
        *_BOOL_FIELDS,
        *_INT_FIELDS,
        *_INT_LIST_FIELDS,
        *_FLOAT_FIELDS,
        "level2_post_norm_block_ids",
        "hidden_act",
        "core_op",
    )
)


class InternImageConfig(BackboneConfigMixin, PretrainedConfig):
    """Configuration of an InternImage model (trunk, classification head and backbone outputs).

    Field names follow the official `InternImage(...)` constructor so official configs load unchanged; the
    OpenGVLab remote-code `config.json` (same `model_type`, `num_classes` instead of `num_labels`) loads too.

    Every field is type- and range-checked when it is set (ints must be ints, booleans bools, floats finite);
    an invalid value raises `ValueError` naming the field.

    `core_op` selects the family: "DCNv3" is InternImage, "DCNv4" FlashInternImage (official `FlashInternImage(...)`
    keyword arguments load unchanged too). Fields whose official default differs between the two take it from
    `core_op` when left None (set `core_op` first when assigning fields one by one):
    - `dw_kernel_size`: DCNv3: the depthwise conv (+ LayerNorm + GELU) offsets and masks are predicted from, None =
      `kernel_size`. DCNv4: the optional depthwise conv (bias, no norm or activation) before `offset_mask`,
      None or 0 = none.
    - `dcn_output_bias` (the DCN output projection's bias) and `mlp_fc2_bias` (the MLP's second Linear's bias):
      None = True for DCNv3 (InternImage always has them), False for DCNv4 (FlashInternImage's defaults).
    FlashInternImage builds its DCNv4 layers with a 3x3 kernel and the centre point, whatever the config says, so
    for DCNv4 `kernel_size` must be 3 and `remove_center` false (anything else is rejected);
    `recompute_sampling_parameters` applies to DCNv3 layers only (ignored for DCNv4); `center_feature_scale` keeps
    its official DCNv4 meaning: it only adds the level norms of post-norm models (the gate never reaches DCNv4).
    """

    model_type = "internimage"

    def __init__(
        self,
        channels: int = 64,
        depths: list[int] | tuple[int, ...] = (4, 4, 18, 4),
        groups: list[int] | tuple[int, ...] = (4, 8, 16, 32),
        kernel_size: int = 3,
        mlp_ratio: float = 4.0,
        offset_scale: float = 1.0,
        layer_scale: float | None = None,
        post_norm: bool = False,
        res_post_norm: bool = False,
        dw_kernel_size: int | None = None,
        level2_post_norm: bool = False,
        level2_post_norm_block_ids: list[int] | None = None,
        center_feature_scale: bool = False,
        use_clip_projector: bool = False,
        remove_center: bool = False,
        cls_scale: float = 1.5,
        projector_dim: int = 1024,
        projector_out_dim: int = 768,
        projector_num_heads: int = 16,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        num_channels: int = 3,
        layer_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        hidden_act: str = "gelu",
        image_size: int = 224,
        recompute_sampling_parameters: bool = True,
        core_op: str = "DCNv3",  # after the older fields: positional calls keep their meaning
        dcn_output_bias: bool | None = None,
        mlp_fc2_bias: bool | None = None,
        out_features: list[str] | None = None,
        out_indices: list[int] | None = None,
        **kwargs,
    ):
        num_classes = kwargs.pop("num_classes", None)
        if num_classes is not None:
            num_classes = _check_int("num_classes", num_classes, 0)
        if kwargs.get("num_labels") is not None:
            kwargs["num_labels"] = _check_int("num_labels", kwargs["num_labels"], 0)
        if num_classes is not None and "id2label" not in kwargs and "num_labels" not in kwargs:
            kwargs["num_labels"] = num_classes
        for key, expected in _IGNORED_OFFICIAL_KEYS.items():
            value = kwargs.pop(key, None)
            if expected is not None and value is not None and value != expected:
                _fail(key, f"{value!r} is not supported (only {expected!r})")
        # Each assignment is checked by __setattr__ (core_op first: the None defaults below depend on it; kernel_size
        # before dw_kernel_size, which defaults to it for DCNv3).
        self.core_op = core_op
        self.channels = channels
        self.depths = depths
        self.groups = groups
        self.kernel_size = kernel_size
        self.mlp_ratio = mlp_ratio
        self.offset_scale = offset_scale
        self.layer_scale = layer_scale
        self.post_norm = post_norm
        self.res_post_norm = res_post_norm
        self.dw_kernel_size = dw_kernel_size
        self.level2_post_norm = level2_post_norm
        self.level2_post_norm_block_ids = level2_post_norm_block_ids
        self.center_feature_scale = center_feature_scale
        self.use_clip_projector = use_clip_projector
        self.remove_center = remove_center
        self.cls_scale = cls_scale
        self.projector_dim = projector_dim
        self.projector_out_dim = projector_out_dim
        self.projector_num_heads = projector_num_heads
        self.drop_rate = drop_rate
        self.drop_path_rate = drop_path_rate
        self.num_channels = num_channels
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.hidden_act = hidden_act
        self.image_size = image_size
        # Training: recompute each DCNv3 layer's offset/mask branch in backward instead of storing it
        # (~20% less activation memory for a few % more time; results are identical).
        self.recompute_sampling_parameters = recompute_sampling_parameters
        self.dcn_output_bias = dcn_output_bias
        self.mlp_fc2_bias = mlp_fc2_bias
        self._validate()
        self.stage_names = ["stem"] + [f"stage{i}" for i in range(1, len(self.depths) + 1)]
        super().__init__(**kwargs)
        self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _CHECKED_FIELDS:
            value = self._checked(name, value)
        super().__setattr__(name, value)

    def _checked(self, name: str, value: Any) -> Any:
        """`_check_field`, with the None defaults that depend on `core_op` resolved (see the class docstring)."""
        core_op = self.__dict__.get("core_op", "DCNv3")
        if name == "dw_kernel_size":
            if core_op == "DCNv4" and (value is None or (_is_int(value) and value == 0)):
                return None  # official DCNv4: no depthwise conv before offset_mask
            if value is None:  # official DCNv3: None means "same as kernel_size"
                value = self.kernel_size
        if name in _CORE_OP_BIAS_DEFAULTS and value is None:
            value = _CORE_OP_BIAS_DEFAULTS[name][core_op]
        return _check_field(name, value)

    # ------------------------------------------------------------------ derived sizes
    @property
    def hidden_sizes(self) -> list[int]:
        """Channels of each level: C, 2C, 4C, 8C."""
        return [self.channels * 2**i for i in range(len(self.depths))]

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def level_norm(self) -> bool:
        """Whether each level ends with a LayerNorm (official: `not post_norm or center_feature_scale`)."""
        return not self.post_norm or self.center_feature_scale

    @property
    def pooled_size(self) -> int:
        """Width of `pooler_output`: the conv head's 1.5 x 8C, or the attention-pooling projector's output."""
        if self.use_clip_projector:
            return self.projector_out_dim
        return int(self.hidden_sizes[-1] * self.cls_scale)

    @property
    def input_multiple(self) -> int:
        """H/G fuse stage 3 with an upsampled stage 4, which only lines up for multiples of 32."""
        return 32 if self.use_clip_projector else 1

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_variant(cls, name: str, **overrides) -> InternImageConfig:
        """Config of an official variant ("t", "s", "b", "l", "xl", "h", "g"; FlashInternImage "flash_t", "flash_s",
        "flash_b", "flash_l"); keyword arguments override fields."""
        key = variant_key(name)
        variant = official_variant(key)
        if variant is None:
            raise ValueError(
                f"Unknown InternImage variant {name!r}; choose one of {', '.join(official_variant_names())}"
            )
        fields = {k: v for k, v in variant.items() if k not in ("eval_size", "train_drop_path_rate")}
        fields["image_size"] = variant["eval_size"]
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> InternImageConfig:
        """Config of a preset (`PRESETS`: "tiny" or an official variant); keyword arguments override fields."""
        key = variant_key(name)
        if key == "tiny":
            return cls(**{**TINY, **overrides})
        if official_variant(key) is None:
            raise ValueError(f"Unknown InternImage preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_variant(key, **overrides)

    # ------------------------------------------------------------------ checks across fields
    def validate(self) -> None:
        """transformers' checks plus every InternImage check (`save_pretrained` calls this)."""
        super().validate()
        for field in sorted(_CHECKED_FIELDS):
            self._checked(field, getattr(self, field))
        self._validate()

    def _validate(self) -> None:
        """Checks that involve several fields (each field's own type and range are checked when it is set)."""
        if len(self.depths) != 4:
            _fail("depths", f"must list 4 levels, got {len(self.depths)} ({self.depths})")
        if len(self.groups) != len(self.depths):
            _fail("groups", f"must have one entry per level ({len(self.depths)}), got {len(self.groups)}")
        for level, (width, group) in enumerate(zip(self.hidden_sizes, self.groups)):
            if width % group != 0:
                _fail("groups", f"level {level} has {width} channels, not divisible by groups[{level}]={group}")
        if self.core_op == "DCNv4":
            # FlashInternImage passes no kernel size or remove_center to its DCNv4 layers: always 3x3, centre kept.
            if self.kernel_size != 3:
                _fail(
                    "kernel_size",
                    f"must be 3 with core_op DCNv4 (FlashInternImage's DCNv4 is 3x3), got {self.kernel_size}",
                )
            if self.remove_center:
                _fail("remove_center", "must be false with core_op DCNv4 (FlashInternImage keeps the centre point)")
        elif self.dw_kernel_size is None:
            _fail("dw_kernel_size", "None (no depthwise conv) exists only with core_op DCNv4; DCNv3 layers need one")
        if self.remove_center and self.kernel_size == 1:
            _fail(
                "remove_center",
                "a 1x1 kernel without its centre has no sampling points (kernel_size must be at "
                "least 3 with remove_center)",
            )
        if int(self.channels * self.mlp_ratio) < 1:
            _fail(
                "mlp_ratio",
                f"{self.mlp_ratio} gives the level-0 MLP int({self.channels} * {self.mlp_ratio}) = 0 hidden units",
            )
        if not self.use_clip_projector and int(self.hidden_sizes[-1] * self.cls_scale) < 1:
            _fail(
                "cls_scale",
                f"{self.cls_scale} gives the classification head int({self.hidden_sizes[-1]} * "
                f"{self.cls_scale}) = 0 channels",
            )
        if self.projector_dim % self.projector_num_heads != 0:
            _fail(
                "projector_num_heads", f"{self.projector_num_heads} does not divide projector_dim {self.projector_dim}"
            )
        if self.use_clip_projector and self.image_size % 32 != 0:
            _fail(
                "image_size",
                f"InternImage-H/G (use_clip_projector) classify images whose sides are multiples of "
                f"32, got {self.image_size}",
            )
        if self.level2_post_norm:
            ids = self.level2_post_norm_block_ids
            if not ids:
                _fail("level2_post_norm_block_ids", "must list block ids when level2_post_norm is set")
            bad = [i for i in ids if not 0 <= i < self.depths[2]]
            if bad:
                _fail("level2_post_norm_block_ids", f"{bad} are outside level 2's {self.depths[2]} blocks")
            if len(set(ids)) != len(ids):
                _fail("level2_post_norm_block_ids", f"must not repeat a block id, got {ids}")


__all__ = ["FLASH_VARIANTS", "InternImageConfig", "VARIANTS"]
