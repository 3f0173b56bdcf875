"""Official InternImage weights -> this package's classes: key mapping, safe loading, atomic output folders.

Sources: official `.pth` files (`{"model": ...}`, `{"model_ema": ...}`, `{"module": ...}` or a bare state dict) and
OpenGVLab remote-code repo folders (`model.` prefix, `layer_scale1/2`, safetensors or `pytorch_model.bin`,
sharded or not). The mapping is one ordered list of regex renames used everywhere (CLI, `from_pretrained` on an
OpenGVLab repo), so there is a single definition of how official names translate.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from .configuration_internimage import InternImageConfig

# Official name (after removing the remote-code `model.` prefix) -> our module names, applied in order.
_KEY_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(p), r)
    for p, r in [
        (r"^model\.", ""),
        (r"\.(?:gamma|layer_scale)([12])$", r".layer_scale\1"),
        (r"^patch_embed\.conv([12])\.", r"embeddings.conv\1."),
        (r"^patch_embed\.norm([12])\.1\.", r"embeddings.norm\1."),
        (r"^levels\.(\d+)\.blocks\.(\d+)\.", r"encoder.levels.\1.layers.\2."),
        (r"(\.layers\.\d+)\.norm([12])\.0\.", r"\1.norm\2."),
        (r"(\.layers\.\d+)\.res_post_norm([12])\.0\.", r"\1.res_post_norm\2."),
        (r"\.dcn\.dw_conv\.0\.", ".dcn.dw_conv.conv."),
        (r"\.dcn\.dw_conv\.1\.1\.", ".dcn.dw_conv.norm."),
        (r"\.dcn\.center_feature_scale_proj_(weight|bias)$", r".dcn.center_feature_scale_proj.\1"),
        (r"^levels\.(\d+)\.post_norms\.(\d+)\.0\.", r"encoder.levels.\1.post_norms.\2."),
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
    ]
]

# Keys that only the official training checkpoints hold (optimizer state etc. live outside the state dict).
_STATE_DICT_KEYS = ("model", "model_ema", "module", "state_dict")


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message says why in one sentence (plus the offending keys)."""


def rename_official_key(key: str, prefix: str = "internimage.") -> str:
    """Our name for one official (or OpenGVLab remote-code) key; `prefix` is added to everything but the head."""
    for pattern, replacement in _KEY_RULES:
        key = pattern.sub(replacement, key)
    if prefix and not key.startswith("classifier."):
        key = prefix + key
    return key


def is_official_layout(keys) -> bool:
    """True for official/OpenGVLab key names (they have `patch_embed`, we have `embeddings`)."""
    return any(k.startswith(("patch_embed.", "model.patch_embed.")) for k in keys)


def convert_official_state_dict(state_dict: Mapping[str, torch.Tensor], prefix: str = "internimage.") -> dict:
    """Rename an official state dict to this package's names (no tensor is copied or changed)."""
    converted = {}
    for key, tensor in state_dict.items():
        new_key = rename_official_key(key, prefix)
        if new_key in converted:
            raise ConversionError(f"Two checkpoint keys map to {new_key!r} (one of them is {key!r})")
        converted[new_key] = tensor
    return converted


def _format_keys(keys, limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_converted_weights(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Strictly load a converted state dict: any missing or unexpected key, or wrong shape, is an error."""
    expected = model.state_dict()
    missing = set(expected) - set(state_dict)
    unexpected = set(state_dict) - set(expected)
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_format_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_format_keys(unexpected)}")
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): " + "; ".join(shapes[:10]))
    if problems:
        raise ConversionError("Checkpoint does not fit this InternImage configuration: " + " | ".join(problems))
    model.load_state_dict(dict(state_dict), strict=True)


# ---------------------------------------------------------------------------------------------- reading sources
def load_pth(path: str | os.PathLike, trust_pickle: bool = False, use_ema: bool = False) -> dict:
    """Read an official `.pth` safely (weights_only unless `trust_pickle`) and return its model state dict."""
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such file") from None
    except Exception as error:  # unpickling errors have many types
        text = str(error)
        if not trust_pickle and ("weights_only" in text or "Unsupported global" in text):
            raise ConversionError(
                f"{path} holds Python objects besides tensors; refusing to unpickle it. If you trust the file, "
                f"pass --trust-pickle (trust_pickle=True)."
            ) from None
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): "
                              f"{text.splitlines()[0] if text else type(error).__name__}") from None
    return extract_state_dict(checkpoint, use_ema=use_ema, source=str(path))


def extract_state_dict(checkpoint, use_ema: bool = False, source: str = "checkpoint") -> dict:
    """The model weights inside a training checkpoint dict, or the dict itself if it is a bare state dict."""
    if not isinstance(checkpoint, Mapping):
        raise ConversionError(f"{source} does not contain a state dict (found {type(checkpoint).__name__})")
    if use_ema:
        if "model_ema" not in checkpoint:
            raise ConversionError(f"{source} has no 'model_ema' entry (keys: {_format_keys(checkpoint.keys())})")
        state = checkpoint["model_ema"]
    else:
        state = next((checkpoint[k] for k in _STATE_DICT_KEYS if k in checkpoint and isinstance(checkpoint[k],
                                                                                              Mapping)), checkpoint)
    bad = [k for k, v in state.items() if not torch.is_tensor(v)]
    if bad:
        raise ConversionError(f"{source}: entries that are not tensors: {_format_keys(bad)}")
    return dict(state)


def load_weights_folder(folder: str | os.PathLike) -> dict:
    """All tensors of a saved model folder: model.safetensors / pytorch_model.bin, single or sharded."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for index_name, loader in (("model.safetensors.index.json", "safetensors"),
                               ("pytorch_model.bin.index.json", "bin")):
        index_path = folder / index_name
        if index_path.is_file():
            shards = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
            break
    else:
        if (folder / "model.safetensors").is_file():
            shards, loader = ["model.safetensors"], "safetensors"
        elif (folder / "pytorch_model.bin").is_file():
            shards, loader = ["pytorch_model.bin"], "bin"
        else:
            raise ConversionError(f"{folder} has no model.safetensors or pytorch_model.bin (sharded or not)")
    state = {}
    for shard in shards:
        path = folder / shard
        try:
            if loader == "safetensors":
                state.update(load_file(path))
            else:
                state.update(extract_state_dict(torch.load(path, map_location="cpu", weights_only=True),
                                                source=str(path)))
        except ConversionError:
            raise
        except Exception as error:
            raise ConversionError(f"{path} could not be read (truncated or corrupt?): {error}") from None
    return state


def read_official_config(path: str | os.PathLike) -> InternImageConfig:
    """InternImageConfig from a JSON file of official constructor keyword arguments (or a remote-code config)."""
    path = Path(path)
    try:
        kwargs = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConversionError(f"{path} is not a readable JSON file: {error}") from None
    for key in ("architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype"):
        kwargs.pop(key, None)
    return InternImageConfig(**kwargs)


# ---------------------------------------------------------------------------------------------- building models
def model_from_official(state_dict: Mapping[str, torch.Tensor], config: InternImageConfig):
    """An InternImageForImageClassification holding the official weights (strict)."""
    from .labels import imagenet_labels
    from .modeling_internimage import InternImageForImageClassification

    head = state_dict.get("head.weight", state_dict.get("model.head.weight"))
    if head is not None and head.shape[0] != config.num_labels:
        config.num_labels = int(head.shape[0])
    labels = imagenet_labels(config.num_labels)
    if labels is not None and all(v.startswith("LABEL_") for v in config.id2label.values()):
        config.id2label = labels
        config.label2id = {v: k for k, v in labels.items()}
    model = InternImageForImageClassification(config)
    load_converted_weights(model, convert_official_state_dict(state_dict))
    return model.eval()


def save_atomically(model, output_dir: str | os.PathLike, image_size: int | None = None,
                    overwrite: bool = False) -> Path:
    """save_pretrained (config, safetensors, preprocessor config) into a temp folder, then move it into place."""
    from .processing import make_image_processor

    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise ConversionError(f"{output_dir} already exists; choose another folder or pass --overwrite")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        model.save_pretrained(tmp)
        make_image_processor(image_size or model.config.image_size).save_pretrained(tmp)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


def load_official_source(source: str | os.PathLike, trust_pickle: bool = False,
                         use_ema: bool = False) -> tuple[dict, InternImageConfig | None]:
    """(state dict, config if the source carries one) from a `.pth` file or an OpenGVLab repo folder."""
    source = Path(source)
    if source.is_dir():
        config = read_official_config(source / "config.json") if (source / "config.json").is_file() else None
        return load_weights_folder(source), config
    if not source.exists():
        raise ConversionError(f"{source}: no such file or folder")
    return load_pth(source, trust_pickle=trust_pickle, use_ema=use_ema), None


def convert(source: str | os.PathLike, output_dir: str | os.PathLike, variant: str | None = None,
            official_config: str | os.PathLike | None = None, overwrite: bool = False,
            trust_pickle: bool = False, use_ema: bool = False) -> Path:
    """Convert an official checkpoint into a `save_pretrained` folder. Returns the folder."""
    if variant and official_config:
        raise ConversionError("Give either --variant or --official-config, not both")
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:  # fail before the (possibly long) load
        raise ConversionError(f"{output_dir} already exists; choose another folder or pass --overwrite")
    state_dict, config = load_official_source(source, trust_pickle=trust_pickle, use_ema=use_ema)
    if official_config:
        config = read_official_config(official_config)
    elif variant:
        config = InternImageConfig.from_variant(variant)
    if config is None:
        raise ConversionError(f"{source}: pass --variant NAME or --official-config FILE to say which model it is")
    model = model_from_official(state_dict, config)
    return save_atomically(model, output_dir, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------- OpenGVLab repos
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


class OfficialRepo:
    """An OpenGVLab remote-code repo (local folder or Hub id) that `from_pretrained` loads natively."""

    def __init__(self, folder: Path):
        self.folder = folder

    @staticmethod
    def _is_official_config(config: dict) -> bool:
        auto_map = config.get("auto_map") or {}
        return "num_classes" in config or any("modeling_internimage" in str(v) for v in auto_map.values())

    @classmethod
    def detect(cls, name_or_path, kwargs: dict) -> "OfficialRepo | None":
        """The repo if `name_or_path` holds an OpenGVLab-format config, else None (cheap: reads config.json only)."""
        hub = {k: kwargs[k] for k in _HUB_KWARGS if kwargs.get(k) is not None}
        local = Path(str(name_or_path)) / hub.get("subfolder", "")
        if local.is_dir():
            config_path = local / "config.json"
            folder = local
        else:
            from transformers.utils import cached_file

            try:
                config_path = cached_file(str(name_or_path), "config.json", _raise_exceptions_for_missing_entries=False,
                                          **hub)
            except Exception:
                return None  # let transformers produce its usual error
            folder = None
        if config_path is None or not Path(config_path).is_file():
            return None
        try:
            config = json.loads(Path(config_path).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if not cls._is_official_config(config):
            return None
        if folder is None:
            from huggingface_hub import snapshot_download

            download = {k: v for k, v in hub.items() if k in ("cache_dir", "force_download", "local_files_only",
                                                              "token", "revision")}
            patterns = ["*.json", "*.safetensors", "*.bin"]
            if hub.get("subfolder"):
                patterns = [f"{hub['subfolder']}/{p}" for p in patterns]
            folder = Path(snapshot_download(str(name_or_path), allow_patterns=patterns, **download))
            folder = folder / hub.get("subfolder", "")
        return cls(folder)

    def config(self, config_class, kwargs: dict):
        """(config, remaining kwargs): a passed `config` wins; otherwise read it and apply config overrides."""
        kwargs = {k: v for k, v in kwargs.items() if k not in _HUB_KWARGS and k != "trust_remote_code"}
        config = kwargs.pop("config", None)
        if config is None:
            config, kwargs = config_class.from_pretrained(self.folder, return_unused_kwargs=True, **kwargs)
        return config, kwargs

    def state_dict(self) -> dict:
        return convert_official_state_dict(load_weights_folder(self.folder))
