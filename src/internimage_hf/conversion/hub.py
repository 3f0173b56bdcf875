"""The Hugging Face Hub side: downloading official sources named `hf://owner/name[/file]`, and uploading converted
folders.

Every network call goes through `huggingface_hub` (`hf_hub_download`, `snapshot_download`, `HfApi.create_repo`,
`HfApi.create_branch`, `HfApi.upload_folder`); an `api` object can be injected (tests pass a fake one). Offline
(`HF_HUB_OFFLINE=1`) downloads only look in the local cache and fail with one clear sentence.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ConversionError

# Hub sources are always explicit: hf://owner/name, optionally followed by a path to one file inside the repo
# (hf://owner/name/dir/file.pth). A bare owner/name is a local path (and an error when it does not exist).
HUB_SCHEME = "hf://"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_HUB_REFERENCE = re.compile(r"^hf://(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:/(?P<file>[^\s]+))?$")
_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.bin"]


def is_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it at import, or as the environment says now."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return bool(constants.is_offline_mode()) or env.strip().upper() in {"1", "ON", "YES", "TRUE"}


def is_repo_id(text: str) -> bool:
    """Whether `text` is a Hub repo id `owner/name`."""
    return bool(_REPO_ID.match(str(text)))


def parse_hub_reference(source: str) -> tuple[str, str | None] | None:
    """(repo_id, file or None) for `hf://owner/name[/file]`; None for anything else (local paths included)."""
    match = _HUB_REFERENCE.match(str(source))
    if not match:
        return None
    file = match["file"]
    if file is not None and any(part in ("", ".", "..") for part in file.split("/")):
        return None
    return match["repo"], file


def download_source(source: str, revision: str | None = None, cache_dir: str | None = None) -> tuple[Path, str | None]:
    """Fetch a Hub source: `hf://owner/name` (a remote-code repo's weights and config) or `hf://owner/name/file.pth`.

    Returns (local path, commit hash or None). Any failure is a ConversionError with one sentence.
    """
    parsed = parse_hub_reference(source)
    if parsed is None:
        raise ConversionError(f"{source}: not a Hub reference of the form {HUB_SCHEME}owner/name[/file]")
    repo_id, filename = parsed
    offline = is_offline()
    try:
        if filename:
            from huggingface_hub import hf_hub_download

            path = Path(
                hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, local_files_only=offline)
            )
        else:
            from huggingface_hub import snapshot_download

            path = Path(
                snapshot_download(
                    repo_id,
                    revision=revision,
                    cache_dir=cache_dir,
                    allow_patterns=_WEIGHT_PATTERNS,
                    local_files_only=offline,
                )
            )
    except Exception as error:  # network, auth, missing repo/file, offline cache miss: all one line
        where = f"{repo_id}/{filename}" if filename else repo_id
        if offline:
            raise ConversionError(
                f"{source} cannot be fetched from the Hugging Face Hub: offline mode (HF_HUB_OFFLINE=1) and {where} "
                f"is not in the local cache"
            ) from None
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConversionError(f"downloading {source} from the Hugging Face Hub failed: {reason}") from None
    parts = path.parts
    commit = parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None
    return path, commit


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    api=None,
) -> str:
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
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            revision=revision,
            create_pr=create_pr,
            commit_message=message,
        )
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConversionError(f"upload of {folder} to {repo_id} failed: {reason}") from None
    for attribute in ("pr_url", "commit_url"):
        url = getattr(info, attribute, None)
        if url:
            return str(url)
    return f"https://huggingface.co/{repo_id}"
