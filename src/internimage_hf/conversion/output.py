"""Writing a converted model: an atomic `save_pretrained` folder (staged beside the output, every tensor re-read
and compared, moved into place), and the sweep of staging folders that killed conversions left behind."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

import torch

from .errors import ConversionError, format_keys
from .source import weight_files


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
        raise ConversionError(f"saved weights lack {format_keys(set(expected) - seen)}")
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

    from ..processing import make_image_processor

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
