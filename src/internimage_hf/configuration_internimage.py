"""InternImage configuration: every official constructor field, transformers conventions, and variant presets."""

from __future__ import annotations

from typing import Any

try:  # transformers >= 5.5
    from transformers.backbone_utils import BackboneConfigMixin
except ImportError:  # pragma: no cover - older 5.x / 4.x
    from transformers.utils.backbone_utils import BackboneConfigMixin
from transformers import PretrainedConfig

# Official architecture of each released variant (SPEC §2). `eval_size` is the resolution its released 1k weights
# were evaluated at; `train_drop_path_rate` the official training value (models load with 0.0, for inference).
VARIANTS: dict[str, dict[str, Any]] = {
    "t": dict(channels=64, depths=[4, 4, 18, 4], groups=[4, 8, 16, 32], offset_scale=1.0, layer_scale=None,
              post_norm=False, eval_size=224, train_drop_path_rate=0.1),
    "s": dict(channels=80, depths=[4, 4, 21, 4], groups=[5, 10, 20, 40], offset_scale=1.0, layer_scale=1e-5,
              post_norm=True, eval_size=224, train_drop_path_rate=0.4),
    "b": dict(channels=112, depths=[4, 4, 21, 4], groups=[7, 14, 28, 56], offset_scale=1.0, layer_scale=1e-5,
              post_norm=True, eval_size=224, train_drop_path_rate=0.5),
    "l": dict(channels=160, depths=[5, 5, 22, 5], groups=[10, 20, 40, 80], offset_scale=2.0, layer_scale=1e-5,
              post_norm=True, eval_size=384, train_drop_path_rate=0.1),
    "xl": dict(channels=192, depths=[5, 5, 24, 5], groups=[12, 24, 48, 96], offset_scale=2.0, layer_scale=1e-5,
               post_norm=True, eval_size=384, train_drop_path_rate=0.2),
    "h": dict(channels=320, depths=[6, 6, 32, 6], groups=[10, 20, 40, 80], offset_scale=1.0, layer_scale=None,
              post_norm=False, res_post_norm=True, dw_kernel_size=5, level2_post_norm=True,
              level2_post_norm_block_ids=[5, 11, 17, 23, 29], center_feature_scale=True, use_clip_projector=True,
              eval_size=640, train_drop_path_rate=0.2),
    "g": dict(channels=512, depths=[2, 2, 48, 4], groups=[16, 32, 64, 128], offset_scale=1.0, layer_scale=None,
              post_norm=True, dw_kernel_size=5, level2_post_norm=True,
              level2_post_norm_block_ids=[5, 11, 17, 23, 29, 35, 41, 47], center_feature_scale=True,
              use_clip_projector=True, eval_size=512, train_drop_path_rate=0.4),
}

# Official constructor keys that carry no information for this port (they select implementations we replace).
_IGNORED_OFFICIAL_KEYS = {"core_op": None, "with_cp": None, "drop_path_type": "linear", "act_layer": "GELU",
                          "norm_layer": "LN"}


class InternImageConfig(BackboneConfigMixin, PretrainedConfig):
    """Configuration of an InternImage model (trunk, classification head and backbone outputs).

    Field names follow the official `InternImage(...)` constructor so official configs load unchanged; the
    OpenGVLab remote-code `config.json` (same `model_type`, `num_classes` instead of `num_labels`) loads too.
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
        out_features: list[str] | None = None,
        out_indices: list[int] | None = None,
        **kwargs,
    ):
        num_classes = kwargs.pop("num_classes", None)
        if num_classes is not None and "id2label" not in kwargs and "num_labels" not in kwargs:
            kwargs["num_labels"] = int(num_classes)
        for key, expected in _IGNORED_OFFICIAL_KEYS.items():
            value = kwargs.pop(key, None)
            if expected is not None and value is not None and value != expected:
                raise ValueError(f"InternImageConfig: {key}={value!r} is not supported (only {expected!r})")
        self.channels = int(channels)
        self.depths = [int(d) for d in depths]
        self.groups = [int(g) for g in groups]
        self.kernel_size = int(kernel_size)
        self.mlp_ratio = float(mlp_ratio)
        self.offset_scale = float(offset_scale)
        self.layer_scale = None if layer_scale is None else float(layer_scale)
        self.post_norm = bool(post_norm)
        self.res_post_norm = bool(res_post_norm)
        self.dw_kernel_size = int(dw_kernel_size) if dw_kernel_size is not None else int(kernel_size)
        self.level2_post_norm = bool(level2_post_norm)
        self.level2_post_norm_block_ids = (
            None if level2_post_norm_block_ids is None else [int(i) for i in level2_post_norm_block_ids]
        )
        self.center_feature_scale = bool(center_feature_scale)
        self.use_clip_projector = bool(use_clip_projector)
        self.remove_center = bool(remove_center)
        self.cls_scale = float(cls_scale)
        self.projector_dim = int(projector_dim)
        self.projector_out_dim = int(projector_out_dim)
        self.projector_num_heads = int(projector_num_heads)
        self.drop_rate = float(drop_rate)
        self.drop_path_rate = float(drop_path_rate)
        self.num_channels = int(num_channels)
        self.layer_norm_eps = float(layer_norm_eps)
        self.initializer_range = float(initializer_range)
        self.hidden_act = hidden_act
        self.image_size = int(image_size)
        # Training: recompute each DCNv3 layer's offset/mask branch in backward instead of storing it
        # (~20% less activation memory for a few % more time; results are identical).
        self.recompute_sampling_parameters = bool(recompute_sampling_parameters)
        self._validate()
        self.stage_names = ["stem"] + [f"stage{i}" for i in range(1, len(self.depths) + 1)]
        super().__init__(**kwargs)
        self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)

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
    def from_variant(cls, name: str, **overrides) -> "InternImageConfig":
        """Config of an official variant ("t", "s", "b", "l", "xl", "h", "g"); keyword arguments override fields."""
        key = str(name).lower().removeprefix("internimage-").removeprefix("internimage_")
        if key not in VARIANTS:
            raise ValueError(f"Unknown InternImage variant {name!r}; choose one of {', '.join(VARIANTS)}")
        fields = {k: v for k, v in VARIANTS[key].items() if k not in ("eval_size", "train_drop_path_rate")}
        fields["image_size"] = VARIANTS[key]["eval_size"]
        fields.update(overrides)
        return cls(**fields)

    def _validate(self) -> None:
        def fail(field: str, message: str):
            raise ValueError(f"InternImageConfig.{field}: {message}")

        if self.channels < 1:
            fail("channels", f"must be positive, got {self.channels}")
        if len(self.depths) != 4:
            fail("depths", f"must list 4 levels, got {len(self.depths)} ({self.depths})")
        if len(self.groups) != len(self.depths):
            fail("groups", f"must have one entry per level ({len(self.depths)}), got {len(self.groups)}")
        if any(d < 1 for d in self.depths):
            fail("depths", f"every level needs at least one layer, got {self.depths}")
        for level, (width, group) in enumerate(zip(self.hidden_sizes, self.groups)):
            if group < 1 or width % group != 0:
                fail("groups", f"level {level} has {width} channels, not divisible by groups[{level}]={group}")
        for field in ("kernel_size", "dw_kernel_size"):
            value = getattr(self, field)
            if value < 1 or value % 2 == 0:
                fail(field, f"must be a positive odd number, got {value}")
        if self.offset_scale <= 0:
            fail("offset_scale", f"must be positive, got {self.offset_scale}")
        if self.mlp_ratio <= 0:
            fail("mlp_ratio", f"must be positive, got {self.mlp_ratio}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            fail("drop_path_rate", f"must be in [0, 1), got {self.drop_path_rate}")
        if not 0.0 <= self.drop_rate < 1.0:
            fail("drop_rate", f"must be in [0, 1), got {self.drop_rate}")
        if self.level2_post_norm:
            ids = self.level2_post_norm_block_ids
            if not ids:
                fail("level2_post_norm_block_ids", "must list block ids when level2_post_norm is set")
            bad = [i for i in ids if not 0 <= i < self.depths[2]]
            if bad:
                fail("level2_post_norm_block_ids", f"{bad} are outside level 2's {self.depths[2]} blocks")
        if self.use_clip_projector and self.projector_dim % self.projector_num_heads != 0:
            fail("projector_num_heads", f"{self.projector_num_heads} does not divide projector_dim "
                                        f"{self.projector_dim}")
        if self.num_channels < 1:
            fail("num_channels", f"must be positive, got {self.num_channels}")


__all__ = ["InternImageConfig", "VARIANTS"]
