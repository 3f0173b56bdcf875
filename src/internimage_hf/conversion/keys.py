"""The one key mapping: official InternImage names -> this package's names.

Official `.pth` state dicts and OpenGVLab remote-code repos (the same names under a `model.` prefix, `gamma1/2` or
`layer_scale1/2`) translate through `KEY_RULES`, an ordered list of regex renames. It is used twice, from one
definition: by the conversion tool (`convert_official_state_dict`) and, as transformers `WeightRenaming`s registered
for model type "internimage" (`remote_code_renamings`), by `from_pretrained` on an OpenGVLab repo.

FlashInternImage (DCNv4) checkpoints use the same rules: their blocks, norms, layer scales, downsampling and heads
are named like InternImage's, and the DCNv4 layer keeps the official submodule names (`dcn.value_proj`,
`dcn.offset_mask_dw`, `dcn.offset_mask`, `dcn.output_proj`), which pass through unchanged.

Each rule has at most one capture group and matches a key at most once, which is what transformers' `WeightRenaming`
supports; both uses therefore rename every key identically.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from .errors import ConversionError

# (pattern, replacement), applied in order. `\1` in a replacement is the pattern's one capture group.
KEY_RULES: tuple[tuple[str, str], ...] = (
    (r"^model\.", ""),
    (r"\.(?:gamma|layer_scale)([12])$", r".layer_scale\1"),
    (r"^patch_embed\.conv([12])\.", r"embeddings.conv\1."),
    (r"^patch_embed\.norm([12])\.1\.", r"embeddings.norm\1."),
    (r"^levels\.(\d+)\.blocks\.", r"encoder.levels.\1.layers."),
    (r"(\.layers\.\d+\.norm[12])\.0\.", r"\1."),
    (r"(\.layers\.\d+\.res_post_norm[12])\.0\.", r"\1."),
    (r"\.dcn\.dw_conv\.0\.", ".dcn.dw_conv.conv."),
    (r"\.dcn\.dw_conv\.1\.1\.", ".dcn.dw_conv.norm."),
    (r"\.dcn\.center_feature_scale_proj_(weight|bias)$", r".dcn.center_feature_scale_proj.\1"),
    (r"^levels\.(\d+\.post_norms\.\d+)\.0\.", r"encoder.levels.\1."),
    (r"^levels\.(\d+)\.norm\.0\.", r"encoder.levels.\1.norm."),
    (r"^levels\.(\d+)\.downsample\.conv\.", r"encoder.levels.\1.downsample.conv."),
    (r"^levels\.(\d+)\.downsample\.norm\.1\.", r"encoder.levels.\1.downsample.norm."),
    (r"^conv_head\.0\.", "pooler.conv."),
    (r"^conv_head\.1\.0\.", "pooler.norm."),
    (r"^dcnv3_head_x4\.0\.", "pooler.stage4_proj."),
    (r"^dcnv3_head_x3\.", "pooler.stage3_proj."),
    (r"^clip_projector\.norm1_([qkv])\.0\.", r"pooler.attention.norm_\1."),
    (r"^clip_projector\.cross_dcn\.", "pooler.attention."),
    (r"^fc_norm\.0\.", "pooler.norm."),
    (r"^head\.", "classifier."),
)
_COMPILED = [(re.compile(pattern), replacement) for pattern, replacement in KEY_RULES]


def rename_official_key(key: str, prefix: str = "internimage.") -> str:
    """Our name for one official (or OpenGVLab remote-code) key; `prefix` is added to everything but the head."""
    for pattern, replacement in _COMPILED:
        key = pattern.sub(replacement, key, count=1)
    if prefix and not key.startswith("classifier."):
        key = prefix + key
    return key


def convert_official_state_dict(state_dict: Mapping, prefix: str = "internimage.") -> dict:
    """Rename an official state dict to this package's names (no tensor is copied or changed)."""
    converted = {}
    for key, tensor in state_dict.items():
        new_key = rename_official_key(key, prefix)
        if new_key in converted:
            raise ConversionError(f"Two checkpoint keys map to {new_key!r} (one of them is {key!r})")
        converted[new_key] = tensor
    return converted


def remote_code_renamings() -> list:
    """`KEY_RULES` as transformers `WeightRenaming`s that act on loading only.

    Registered for model type "internimage" (`internimage_hf._register`), they let `from_pretrained` read OpenGVLab's
    remote-code repos natively. Our own checkpoints never hold an official name, so the rules leave them alone. Saving
    writes this package's names: transformers would otherwise reverse the renamings on `save_pretrained`
    (`save_original_format`), so the reverse of each is a renaming that matches nothing."""
    from transformers.core_model_loading import WeightRenaming

    class LoadOnlyRenaming(WeightRenaming):
        __slots__ = ()

        def reverse_transform(self):
            return WeightRenaming(source_patterns=r"(?!)", target_patterns="")

    return [LoadOnlyRenaming(source_patterns=pattern, target_patterns=target) for pattern, target in KEY_RULES]
