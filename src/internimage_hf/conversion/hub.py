"""The Hugging Face Hub side: downloading official sources by repo id, and uploading converted folders.

Every network call goes through `huggingface_hub` (`hf_hub_download`, `snapshot_download`, `HfApi.create_repo`,
`HfApi.create_branch`, `HfApi.upload_folder`); an `api` object can be injected (tests pass a fake one). Offline
(`HF_HUB_OFFLINE=1`) downloads only look in the local cache and fail with one clear sentence.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..convert import ConversionError

# owner/name, optionally followed by a path to one file inside the repo (owner/name/dir/file.pth)
_HUB_REFERENCE = re.compile(r"^(?:hf://)?(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:/(?P<file>[^\s]+))?$")
_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.bin"]


def is_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it at import, or as the environment says now."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return bool(constants.is_offline_mode()) or env.strip().upper() in {"1", "ON", "YES", "TRUE"}


def parse_hub_reference(source: str) -> tuple[str, str | None] | None:
    """(repo_id, file or None) when `source` reads as a Hub reference and is not a local path; else None."""
    text = str(source)
    if Path(text).exists() or text.startswith((".", "/", "~")) or "\\" in text:
        return None
    match = _HUB_REFERENCE.match(text)
    if not match:
        return None
    return match["repo"], match["file"]


def download_source(source: str, revision: str | None = None, cache_dir: str | None = None) -> tuple[Path, str | None]:
    """Fetch a Hub source: `owner/name` (a whole remote-code repo's weights and config) or `owner/name/file.pth`.

    Returns (local path, commit hash or None). Any failure is a ConversionError with one sentence.
    """
    parsed = parse_hub_reference(source)
    if parsed is None:
        raise ConversionError(f"{source}: no such file or folder, and not a Hub repo id (owner/name[/file])")
    repo_id, filename = parsed
    offline = is_offline()
    try:
        if filename:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                        local_files_only=offline))
        else:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                          allow_patterns=_WEIGHT_PATTERNS, local_files_only=offline))
    except Exception as error:  # network, auth, missing repo/file, offline cache miss: all one line
        where = f"{repo_id}/{filename}" if filename else repo_id
        if offline:
            raise ConversionError(
                f"{source} is not a local path and cannot be fetched from the Hugging Face Hub: offline mode "
                f"(HF_HUB_OFFLINE=1) and {where} is not in the local cache"
            ) from None
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConversionError(f"{source} is not a local path, and downloading it from the Hugging Face Hub "
                              f"failed: {reason}") from None
    parts = path.parts
    commit = parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None
    return path, commit


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
                create_pr: bool = False, commit_message: str | None = None, api=None) -> str:
    """Create the model repo if needed (and the branch `revision`), upload the folder; returns the commit/PR URL."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    folder = Path(folder)
    message = commit_message or f"Upload {folder.name} converted with internimage_hf"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                                 create_pr=create_pr, commit_message=message)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConversionError(f"upload of {folder} to {repo_id} failed: {reason}") from None
    for attribute in ("pr_url", "commit_url"):
        url = getattr(info, attribute, None)
        if url:
            return str(url)
    return f"https://huggingface.co/{repo_id}"
