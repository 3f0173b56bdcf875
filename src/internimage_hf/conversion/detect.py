"""Which InternImage is this? The architecture read from a state dict's key names and tensor shapes.

Detection works on *converted* names (`internimage.embeddings.conv2.weight`, ...), i.e. after the one key mapping
in `keys`, so `.pth` files and OpenGVLab remote-code repos are read the same way. Only shapes are
used, so meta tensors work. What keys cannot tell (offset_scale, the layer-scale init value, post-norm when a level
norm is present, which level-2 blocks carry post-norms) comes from the matched VARIANTS entry.

FlashInternImage (DCNv4) state dicts are told apart by their `dcn.offset_mask` / `dcn.value_proj` keys; their groups
are read from `offset_mask`'s padded width (ceil(27 G / 8) * 8), and the variant from `FLASH_VARIANTS`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from ..configuration_internimage import InternImageConfig, official_variant, official_variant_names, variant_key
from .errors import ConversionError

_PREFIX = "internimage."
_POINTS = 9  # 3x3 sampling points: every release uses kernel_size 3 and keeps the centre point


@dataclass(frozen=True)
class Architecture:
    """What the weights say about the model (everything shape- or key-visible)."""

    channels: int
    depths: tuple[int, ...]
    groups: tuple[int, ...]
    dw_kernel_size: int | None  # DCNv4: the conv before offset_mask, None if there is none
    mlp_ratio: float
    layer_scale: bool
    res_post_norm: bool
    level2_post_norms: int  # how many post-norms level 2 has (their block ids are not visible)
    level_norm: bool
    center_feature_scale: bool
    clip_projector: bool
    pooled_size: int
    num_labels: int
    core_op: str = "DCNv3"
    dcn_output_bias: bool = True
    mlp_fc2_bias: bool = True

    def trunk(self) -> dict:
        """The fields a variant fixes (everything but the head size)."""
        fields = asdict(self)
        fields.pop("num_labels")
        return fields

    def short(self) -> str:
        return f"channels {self.channels}, depths {_join(self.depths)}"

    def describe(self) -> str:
        parts = [self.short(), f"groups {_join(self.groups)}", f"dw kernel {self.dw_kernel_size}"]
        if self.core_op == "DCNv4":
            parts[-1] = f"offset_mask dw kernel {self.dw_kernel_size or 'none'}"
            parts.insert(0, "DCNv4")
            parts.append(f"output_proj bias {'yes' if self.dcn_output_bias else 'no'}")
            parts.append(f"mlp.fc2 bias {'yes' if self.mlp_fc2_bias else 'no'}")
        if self.mlp_ratio != 4:
            parts.append(f"mlp ratio {self.mlp_ratio:g}")
        parts.append("layer scale" if self.layer_scale else "no layer scale")
        if self.res_post_norm:
            parts.append("res-post-norm")
        if self.level2_post_norms:
            parts.append(f"{self.level2_post_norms} level-2 post-norms")
        if self.center_feature_scale:
            parts.append("center feature scale")
        parts.append("attention-pooling head" if self.clip_projector else "conv head")
        parts.append(f"{self.num_labels} classes")
        return ", ".join(parts)


def _join(values) -> str:
    return ",".join(str(v) for v in values)


def variant_title(name: str) -> str:
    """ "t" -> "InternImage-T", "flash_t" -> "FlashInternImage-T"."""
    if name.startswith("flash_"):
        return f"FlashInternImage-{name.removeprefix('flash_').upper()}"
    return f"InternImage-{name.upper()}"


def normalize_variant(name: str) -> str:
    key = variant_key(name)
    if official_variant(key) is None:
        raise ConversionError(f"Unknown variant {name!r}; choose one of {', '.join(official_variant_names())}")
    return key


def _dcnv4_groups(rows: int, level: int) -> int:
    """The group count whose padded offset_mask width is `rows` (widths of consecutive counts differ by >= 24)."""
    from ..ops import dcnv4_offset_mask_channels  # the op's own rule; imported here to keep detection light

    for groups in range(1, rows // 3 + 1):
        if dcnv4_offset_mask_channels(groups, _POINTS) == rows:
            return groups
    raise ConversionError(
        f"Level {level}'s DCNv4 offset_mask has {rows} outputs, not ceil(27 G / 8) * 8 for any group count G (3x3 "
        f"points): not a released FlashInternImage layout; pass --official-config FILE"
    )


def architecture_from_state_dict(state_dict: Mapping) -> Architecture:
    """Read the architecture of a converted state dict (this package's key names). Shapes only."""
    sd = {k.removeprefix(_PREFIX): v for k, v in state_dict.items()}

    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise ConversionError(
                f"Not an InternImage state dict: after renaming the official keys it has no {key!r}; pass "
                f"--official-config FILE if this is a modified InternImage"
            )
        return tuple(sd[key].shape)

    channels = shape("embeddings.conv2.weight")[0]
    layer_ids: dict[int, set[int]] = {}
    for key in sd:
        match = re.match(r"encoder\.levels\.(\d+)\.layers\.(\d+)\.", key)
        if match:
            layer_ids.setdefault(int(match[1]), set()).add(int(match[2]))
    if not layer_ids or sorted(layer_ids) != list(range(len(layer_ids))):
        raise ConversionError(f"Not an InternImage state dict: levels found {sorted(layer_ids)}")
    depths = tuple(len(layer_ids[level]) for level in sorted(layer_ids))
    first = "encoder.levels.0.layers.0."
    dcnv4 = first + "dcn.offset_mask.weight" in sd or first + "dcn.value_proj.weight" in sd
    groups = []
    for level in range(len(depths)):
        if dcnv4:
            groups.append(_dcnv4_groups(shape(f"encoder.levels.{level}.layers.0.dcn.offset_mask.weight")[0], level))
            continue
        rows = shape(f"encoder.levels.{level}.layers.0.dcn.mask.weight")[0]
        if rows % _POINTS:
            raise ConversionError(
                f"Level {level}'s DCNv3 mask has {rows} outputs, not a multiple of 9 (3x3 points): not a released "
                f"InternImage layout; pass --official-config FILE"
            )
        groups.append(rows // _POINTS)
    if dcnv4:
        dw = first + "dcn.offset_mask_dw.weight"
        dw_kernel_size = shape(dw)[-1] if dw in sd else None
    else:
        dw_kernel_size = shape(first + "dcn.dw_conv.conv.weight")[-1]
    post_norm_ids = {int(m[1]) for k in sd if (m := re.match(r"encoder\.levels\.2\.post_norms\.(\d+)\.", k))}
    clip = "pooler.attention.q.weight" in sd or "pooler.stage4_proj.weight" in sd
    pooled = shape("pooler.attention.proj.weight")[0] if clip else shape("pooler.conv.weight")[0]
    return Architecture(
        channels=channels,
        depths=depths,
        groups=tuple(groups),
        dw_kernel_size=dw_kernel_size,
        mlp_ratio=shape(first + "mlp.fc1.weight")[0] / channels,
        layer_scale=first + "layer_scale1" in sd,
        res_post_norm=first + "res_post_norm1.weight" in sd,
        level2_post_norms=len(post_norm_ids),
        level_norm="encoder.levels.0.norm.weight" in sd,
        center_feature_scale=first + "dcn.center_feature_scale_proj.weight" in sd,
        clip_projector=clip,
        pooled_size=pooled,
        num_labels=shape("classifier.weight")[0] if "classifier.weight" in sd else 0,
        core_op="DCNv4" if dcnv4 else "DCNv3",
        dcn_output_bias=first + "dcn.output_proj.bias" in sd,
        mlp_fc2_bias=first + "mlp.fc2.bias" in sd,
    )


def architecture_from_config(config: InternImageConfig) -> Architecture:
    """The Architecture a model built from `config` has (what its state dict would show)."""
    return Architecture(
        channels=config.channels,
        depths=tuple(config.depths),
        groups=tuple(config.groups),
        dw_kernel_size=config.dw_kernel_size,
        mlp_ratio=config.mlp_ratio,
        layer_scale=config.layer_scale is not None,
        res_post_norm=config.res_post_norm,
        level2_post_norms=len(config.level2_post_norm_block_ids or []) if config.level2_post_norm else 0,
        level_norm=config.level_norm,
        center_feature_scale=config.center_feature_scale,
        clip_projector=config.use_clip_projector,
        pooled_size=config.pooled_size,
        num_labels=config.num_labels,
        core_op=config.core_op,
        dcn_output_bias=config.dcn_output_bias,
        mlp_fc2_bias=config.mlp_fc2_bias,
    )


def variant_architecture(name: str) -> Architecture:
    return architecture_from_config(InternImageConfig.from_variant(name, num_labels=1))


def match_variant(architecture: Architecture) -> str | None:
    """The VARIANTS / FLASH_VARIANTS entry whose trunk and head type equal `architecture`'s (None: not an official
    variant)."""
    trunk = architecture.trunk()
    for name in official_variant_names():
        if variant_architecture(name).trunk() == trunk:
            return name
    return None


def check_variant(architecture: Architecture, requested: str) -> str:
    """`requested` (normalised) if the weights are that variant or no official one; an error if another one."""
    requested = normalize_variant(requested)
    found = match_variant(architecture)
    if found is not None and found != requested:
        raise ConversionError(
            f"state dict looks like {variant_title(found)} ({architecture.short()}) but --variant {requested} was "
            f"given ({variant_title(requested)} has {variant_architecture(requested).short()})"
        )
    return requested
