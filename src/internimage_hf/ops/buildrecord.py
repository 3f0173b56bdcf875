"""What a local kernel build records on disk, and the checks made before anything in it is imported.

Shared by the builder (which writes the record) and the loader (which verifies it), so that neither imports the
other.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path


def read_metadata(path: Path) -> dict:
    with open(path / "metadata.json", encoding="utf-8") as f:
        meta = json.load(f)
    if not isinstance(meta, dict) or "id" not in meta:
        raise ValueError(f"{path / 'metadata.json'} is not a kernel metadata file")
    return meta


_SAFE_NAME = re.compile(r"[A-Za-z0-9_]{1,200}")
_LIB_SUFFIXES = (".so", ".pyd")


class KernelCacheError(RuntimeError):
    """A local kernel build is unusable (malformed metadata, a missing or modified file); the message says why."""


def _safe_name(value, what: str, path: Path) -> str:
    if not isinstance(value, str) or not _SAFE_NAME.fullmatch(value):
        raise KernelCacheError(f"{path / 'metadata.json'} has an invalid {what} {value!r} (letters, digits and _ only)")
    return value


def build_record(path: Path) -> tuple[dict, dict]:
    """(metadata, our build record) of a variant folder, with every name that later becomes a module or file name
    validated. Raises KernelCacheError (or OSError / ValueError for an unreadable file)."""
    meta = read_metadata(path)
    _safe_name(meta.get("id"), "id", path)
    record = meta.get("internimage_hf")
    if not isinstance(record, dict):
        raise KernelCacheError(f"{path / 'metadata.json'} has no internimage_hf build record")
    _safe_name(record.get("ext_name"), "ext_name", path)
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        raise KernelCacheError(f"{path} was built without a file integrity record (an older internimage_hf)")
    for name, entry in files.items():
        if (
            not isinstance(name, str)
            or name != Path(name).name
            or name in {"", ".", ".."}
            or not isinstance(entry, dict)
            or not isinstance(entry.get("size"), int)
            or not isinstance(entry.get("sha256"), str)
        ):
            raise KernelCacheError(f"{path / 'metadata.json'} has a malformed file record {name!r}")
    return meta, record


def file_record(path: Path) -> dict:
    """{"size", "sha256"} of one file (what `build_kernels` records and `verify_build` checks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


_VERIFIED: dict[tuple, bool] = {}  # (file, size, mtime, inode) -> checked: each file is hashed once per process


def verify_build(path: Path, record: dict) -> None:
    """Check every file of the build against the sizes and SHA-256 digests recorded at build time, before anything is
    imported or mapped (a truncated library would otherwise crash the process with SIGBUS on first use), and that
    the one library Python will import for the extension is the recorded one. Raises KernelCacheError."""
    ext_name = record["ext_name"]
    libs = sorted(p.name for p in path.iterdir() if p.name.split(".")[0] == ext_name and p.suffix in _LIB_SUFFIXES)
    recorded_libs = sorted(n for n in record["files"] if n.split(".")[0] == ext_name)
    if not libs:
        raise KernelCacheError(f"the kernel library {ext_name}.* is missing from {path}")
    if libs != recorded_libs or len(libs) != 1:
        raise KernelCacheError(f"{path} holds kernel libraries {libs}, the build recorded {recorded_libs}")
    for name, entry in record["files"].items():
        file = path / name
        try:
            st = file.stat()
        except OSError as err:
            raise KernelCacheError(f"{file} is missing ({type(err).__name__})") from err
        key = (str(file.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
        if _VERIFIED.get(key):
            continue
        if st.st_size != entry["size"]:
            raise KernelCacheError(
                f"{file} has {st.st_size} bytes, the build wrote {entry['size']} (truncated or modified)"
            )
        if file_record(file)["sha256"] != entry["sha256"]:
            raise KernelCacheError(
                f"{file} differs from the file the build wrote (SHA-256 mismatch: corrupt or modified)"
            )
        _VERIFIED[key] = True
