"""Official InternImage weights -> this package's classes: key mapping, safe loading, atomic output folders.

Sources: official `.pth` files (`{"model": ...}`, `{"model_ema": ...}`, `{"module": ...}` or a bare state dict) and
OpenGVLab remote-code repo folders (`model.` prefix, `layer_scale1/2`, safetensors or `pytorch_model.bin`,
sharded or not). The mapping is one ordered list of regex renames used everywhere (CLI, `from_pretrained` on an
OpenGVLab repo), so there is a single definition of how official names translate.

The full tool (variant detection, labels, model cards, verification, Hub download/upload, manifest batches) lives in
`internimage_hf.conversion`; `convert()` here is its entry point.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
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


class PickleRefused(ConversionError):
    """A `.pth` holds Python objects besides tensors, and unpickling it was not allowed."""


def rename_official_key(key: str, prefix: str = "internimage.") -> str:
    """Our name for one official (or OpenGVLab remote-code) key; `prefix` is added to everything but the head."""
    for pattern, replacement in _KEY_RULES:
        key = pattern.sub(replacement, key)
    if prefix and not key.startswith("classifier."):
        key = prefix + key
    return key


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


def load_converted_weights(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], assign: bool = False
) -> None:
    """Strictly load a converted state dict: any missing or unexpected key, or wrong shape, is an error.

    `assign=True` makes the tensors the model's parameters (for a model built on the meta device)."""
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
    model.load_state_dict(dict(state_dict), strict=True, assign=assign)


# ---------------------------------------------------------------------------------------------- reading sources
def load_pth(path: str | os.PathLike, trust_pickle: bool = False, use_ema: bool = False) -> dict:
    """Read an official `.pth` safely (weights_only unless `trust_pickle`) and return its model state dict."""
    path = Path(path)
    try:
        try:  # memory-map zip checkpoints: a 12 GB file need not be read into memory before it is converted
            checkpoint = torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            checkpoint = torch.load(path, map_location="cpu", weights_only=not trust_pickle)  # legacy format
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such file") from None
    except Exception as error:  # unpickling errors have many types
        text = str(error)
        if not trust_pickle and ("weights_only" in text or "Unsupported global" in text):
            raise PickleRefused(
                f"{path} holds Python objects besides tensors; refusing to unpickle it. If you trust the file, "
                f"pass --trust-pickle (trust_pickle=True)."
            ) from None
        raise ConversionError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): "
            f"{text.splitlines()[0] if text else type(error).__name__}"
        ) from None
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
        state = next(
            (checkpoint[k] for k in _STATE_DICT_KEYS if k in checkpoint and isinstance(checkpoint[k], Mapping)),
            checkpoint,
        )
    bad = [k for k, v in state.items() if not torch.is_tensor(v)]
    if bad:
        raise ConversionError(f"{source}: entries that are not tensors: {_format_keys(bad)}")
    return dict(state)


def check_tensors(state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Refuse, naming the tensor, what cannot be an InternImage weight: complex or non-float dtypes, 0-d weights,
    NaN or Inf values (integer 0-d `num_batches_tracked` counters are fine). Meta tensors are checked by dtype and
    shape only."""
    for key, tensor in state_dict.items():
        where = f"{source}: tensor {key!r}"
        if tensor.is_complex():
            raise ConversionError(f"{where} is complex ({tensor.dtype}); InternImage weights are real numbers")
        if key.endswith("num_batches_tracked"):
            if tensor.is_floating_point() or tensor.dtype == torch.bool or tensor.numel() != 1:
                raise ConversionError(
                    f"{where} should be one integer (a batch-norm counter); found {tensor.dtype} "
                    f"of shape {tuple(tensor.shape)}"
                )
            continue
        if not tensor.is_floating_point():
            raise ConversionError(f"{where} has dtype {tensor.dtype}; InternImage weights are floating point")
        if tensor.ndim == 0:
            raise ConversionError(f"{where} is a 0-d scalar; every InternImage weight has at least one dimension")
        if tensor.device.type != "meta":
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                found = (("NaN", torch.isnan), ("Inf", torch.isinf))
                kinds = " and ".join(name for name, test in found if bool(test(tensor).any()))
                raise ConversionError(
                    f"{where} holds {bad} {kinds} value{'s' if bad > 1 else ''} (of "
                    f"{tensor.numel()}); refusing to convert broken weights"
                )


def weight_files(folder: str | os.PathLike) -> tuple[list[Path], str]:
    """(weight files, "safetensors" | "bin") of a saved model folder, following a shard index when there is one."""
    folder = Path(folder)
    for index_name, loader in (
        ("model.safetensors.index.json", "safetensors"),
        ("pytorch_model.bin.index.json", "bin"),
    ):
        index_path = folder / index_name
        if index_path.is_file():
            try:
                shards = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as error:
                raise ConversionError(f"{index_path} is not a readable shard index: {error}") from None
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise ConversionError(f"{index_path} lists shards that are not there: {_format_keys(missing)}")
            return [folder / s for s in shards], loader
    for name, loader in (("model.safetensors", "safetensors"), ("pytorch_model.bin", "bin")):
        if (folder / name).is_file():
            return [folder / name], loader
    raise ConversionError(f"{folder} has no model.safetensors or pytorch_model.bin (sharded or not)")


def load_weights_folder(folder: str | os.PathLike) -> dict:
    """All tensors of a saved model folder: model.safetensors / pytorch_model.bin, single or sharded."""
    from safetensors.torch import load_file

    paths, loader = weight_files(folder)
    state = {}
    for path in paths:
        try:
            if loader == "safetensors":
                state.update(load_file(path))
            else:
                state.update(
                    extract_state_dict(torch.load(path, map_location="cpu", weights_only=True), source=str(path))
                )
        except ConversionError:
            raise
        except Exception as error:
            raise ConversionError(f"{path} could not be read (truncated or corrupt?): {error}") from None
    return state


def read_official_config(path: str | os.PathLike) -> InternImageConfig:
    """InternImageConfig from a JSON file of official constructor keyword arguments (or a remote-code config)."""
    path = Path(path)
    try:
        kwargs = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise ConversionError(f"{path} is not a readable JSON file: {error}") from None
    if not isinstance(kwargs, dict):
        kind = {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(kwargs), "null")
        raise ConversionError(
            f"{path} holds a JSON {kind}; it must be a JSON object of official InternImage(...) keyword arguments"
        )
    for key in ("architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype"):
        kwargs.pop(key, None)
    try:
        return InternImageConfig(**kwargs)
    except Exception as error:  # wrong value types or ranges: the config's own check, as one line
        text = " ".join(str(error).split()) or type(error).__name__
        raise ConversionError(f"{path} is not a valid InternImage configuration: {text}") from None


# ---------------------------------------------------------------------------------------------- building models
def model_from_official(state_dict: Mapping[str, torch.Tensor], config: InternImageConfig):
    """An InternImageForImageClassification holding the official weights (strict; head size and ImageNet names
    follow the checkpoint's head)."""
    from .conversion.pipeline import build_model, plan_conversion

    converted = convert_official_state_dict(state_dict)
    return build_model(plan_conversion(converted, config=config), converted)


def check_saved_weights(folder: str | os.PathLike, model: torch.nn.Module) -> int:
    """Re-read every saved tensor (shard by shard) and compare it bit for bit with the model. Returns the count."""
    from safetensors import safe_open

    expected = model.state_dict()
    seen = set()
    for path in weight_files(folder)[0]:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if key not in expected or not torch.equal(handle.get_tensor(key), expected[key].detach().cpu()):
                    raise ConversionError(f"saved tensor {key!r} in {path.name} differs from the converted model")
                seen.add(key)
    if seen != set(expected):
        raise ConversionError(f"saved weights lack {_format_keys(set(expected) - seen)}")
    return len(seen)


# Staging folders beside an output: `.internimage-hf-{new|old}-{pid}-{host}-{random}-{name}`. A conversion killed
# mid-save (SIGKILL, power loss) cannot clean up after itself; the next save into the same parent folder removes the
# staging folders of dead processes of this host (and puts back an output a killed --overwrite had moved aside).
_STAGING_PREFIX = ".internimage-hf-"
_STAGING_NAME = re.compile(r"^\.internimage-hf-(new|old)-(\d+)-([0-9a-f]{8})-")


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _staging_prefix(kind: str) -> str:
    return f"{_STAGING_PREFIX}{kind}-{os.getpid()}-{_host_tag()}-"


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # pragma: no cover - os.kill would terminate the process there: never sweep
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, owned by someone else
        return True
    return True


def sweep_staging(parent: str | os.PathLike) -> list[Path]:
    """Remove staging folders left in `parent` by conversions that were killed; returns what was removed.

    Only folders of this naming scheme, made on this host by processes that no longer exist, are touched. An output
    that a killed `--overwrite` had already moved aside (and not yet replaced) is moved back first."""
    parent = Path(parent)
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    host = _host_tag()
    for entry in entries:
        match = _STAGING_NAME.match(entry.name)
        if not match or match[3] != host or _pid_alive(int(match[2])) or not entry.is_dir() or entry.is_symlink():
            continue
        if match[1] == "old":
            for inner in list(entry.iterdir()):
                target = parent / inner.name
                if not target.exists() and not target.is_symlink():
                    try:
                        os.replace(inner, target)
                    except OSError:
                        pass
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            removed.append(entry)
    return removed


def _publishable_permissions(folder: Path) -> None:
    """mkdtemp makes 0700 folders and transformers writes 0600 weights; give the output the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def save_atomically(
    model,
    output_dir: str | os.PathLike,
    image_size: int | None = None,
    overwrite: bool = False,
    *,
    max_shard_size: str | int | None = None,
    card: str | None = None,
) -> Path:
    """Write config, safetensors (sharded above `max_shard_size`), preprocessor config and the README card into
    a staging folder next to `output_dir`, re-read the weights, then move the folder into place. On any failure the
    staging folder is removed and an existing `output_dir` is untouched; staging folders of killed runs are swept
    by the next save into the same folder (`sweep_staging`)."""
    from transformers.utils import logging as hf_logging

    from .processing import make_image_processor

    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise ConversionError(f"{output_dir} already exists; choose another folder or pass --overwrite")
    parent = output_dir.parent
    suffix = "-" + output_dir.name[:80]
    try:
        parent.mkdir(parents=True, exist_ok=True)
        sweep_staging(parent)
        tmp = Path(tempfile.mkdtemp(prefix=_staging_prefix("new"), suffix=suffix, dir=parent))
    except OSError as error:
        raise ConversionError(f"cannot write into {parent}: {error.strerror or error}") from None
    old = None
    bars = hf_logging.is_progress_bar_enabled()
    try:
        save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
        hf_logging.disable_progress_bar()  # the caller reports progress; no "Writing model shards" bar
        try:
            model.save_pretrained(tmp, **save_kwargs)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        make_image_processor(image_size or model.config.image_size).save_pretrained(tmp)
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
        check_saved_weights(tmp, model)
        _publishable_permissions(tmp)
        if output_dir.exists():  # keep the old folder until the new one is in place
            old = Path(tempfile.mkdtemp(prefix=_staging_prefix("old"), suffix=suffix, dir=parent))
            os.replace(output_dir, old / output_dir.name)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / output_dir.name).exists() and not output_dir.exists():
            os.replace(old / output_dir.name, output_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return output_dir


def load_official_source(
    source: str | os.PathLike, trust_pickle: bool = False, use_ema: bool = False
) -> tuple[dict, InternImageConfig | None]:
    """(state dict, config if the source carries one) from a `.pth` file or an OpenGVLab repo folder."""
    source = Path(source)
    if source.is_dir():
        config = read_official_config(source / "config.json") if (source / "config.json").is_file() else None
        return load_weights_folder(source), config
    if not source.exists():
        raise ConversionError(f"{source}: no such file or folder")
    return load_pth(source, trust_pickle=trust_pickle, use_ema=use_ema), None


def convert(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    variant: str | None = None,
    official_config: str | os.PathLike | None = None,
    overwrite: bool = False,
    trust_pickle: bool = False,
    use_ema: bool = False,
    **options,
) -> Path:
    """Convert an official checkpoint into a `save_pretrained` folder (with model card). Returns the folder.

    The variant is detected from the weights unless `variant` / `official_config` say otherwise; `options` are
    those of `internimage_hf.conversion.pipeline.convert_checkpoint` (labels, image_size, expected, tolerance,
    max_shard_size, model_id, release, ...).
    """
    from .conversion.pipeline import convert_checkpoint

    return convert_checkpoint(
        source,
        output_dir,
        variant=variant,
        official_config=official_config,
        overwrite=overwrite,
        trust_pickle=trust_pickle,
        use_ema=use_ema,
        **options,
    ).output_dir


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
    def detect(cls, name_or_path, kwargs: dict) -> OfficialRepo | None:
        """The repo if `name_or_path` holds an OpenGVLab-format config, else None (cheap: reads config.json only)."""
        hub = {k: kwargs[k] for k in _HUB_KWARGS if kwargs.get(k) is not None}
        local = Path(str(name_or_path)) / hub.get("subfolder", "")
        if local.is_dir():
            config_path = local / "config.json"
            folder = local
        else:
            from transformers.utils import cached_file

            try:
                config_path = cached_file(
                    str(name_or_path), "config.json", _raise_exceptions_for_missing_entries=False, **hub
                )
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

            download = {
                k: v
                for k, v in hub.items()
                if k in ("cache_dir", "force_download", "local_files_only", "token", "revision")
            }
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
