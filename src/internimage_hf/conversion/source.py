"""Reading official checkpoints safely: `.pth` files (`{"model": ...}`, `{"model_ema": ...}`, `{"module": ...}` or a
bare state dict) and OpenGVLab remote-code repo folders (safetensors or `pytorch_model.bin`, sharded or not), their
JSON configs, and the checks every tensor passes before it is converted."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..configuration_internimage import InternImageConfig
from .errors import ConversionError, PickleRefused, format_keys

# Keys that only the official training checkpoints hold (optimizer state etc. live outside the state dict).
_STATE_DICT_KEYS = ("model", "model_ema", "module", "state_dict")


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
            raise ConversionError(f"{source} has no 'model_ema' entry (keys: {format_keys(checkpoint.keys())})")
        state = checkpoint["model_ema"]
    else:
        state = next(
            (checkpoint[k] for k in _STATE_DICT_KEYS if k in checkpoint and isinstance(checkpoint[k], Mapping)),
            checkpoint,
        )
    bad = [k for k, v in state.items() if not torch.is_tensor(v)]
    if bad:
        raise ConversionError(f"{source}: entries that are not tensors: {format_keys(bad)}")
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
                raise ConversionError(f"{index_path} lists shards that are not there: {format_keys(missing)}")
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
