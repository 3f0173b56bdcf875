"""`AutoBackbone.from_pretrained(<local folder>)` that works offline.

transformers' AutoBackbone asks the Hub whether its argument is a repo (`repo_exists`) before loading, to tell
transformers checkpoints from timm model names, and does so even for a local folder: offline that raises
OfflineModeIsEnabled, with an unreachable network it waits for a timeout, and with a network it sends the folder's
name to the Hub. A local folder is never a timm name, so for one we go straight to the generic Auto loading (what
the check would have chosen for a repo); every other argument keeps transformers' own path.
"""

from __future__ import annotations

import functools
import os

_MARK = "_internimage_local_folders_first"


def load_local_folders_directly(auto_backbone: type) -> None:
    """Make `auto_backbone.from_pretrained` load local folders without a Hub query (idempotent)."""
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    original = auto_backbone.from_pretrained.__func__
    if getattr(original, _MARK, False):
        return
    generic = _BaseAutoModelClass.from_pretrained.__func__

    @functools.wraps(original)
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        if isinstance(pretrained_model_name_or_path, (str, os.PathLike)) and os.path.isdir(
            pretrained_model_name_or_path
        ):
            kwargs.pop("use_timm_backbone", None)
            return generic(cls, pretrained_model_name_or_path, *model_args, **kwargs)
        return original(cls, pretrained_model_name_or_path, *model_args, **kwargs)

    setattr(from_pretrained, _MARK, True)
    auto_backbone.from_pretrained = classmethod(from_pretrained)
