"""`internimage-hf convert-all MANIFEST`: convert (and push) a list of checkpoints; one failure stops nothing.

Each entry gets a progress bar (read, detect, load, verify, save[, push]) and a row in the closing summary table.
Sources are looked up in --source-dir (a `.pth` file or a remote-code repo folder named after the entry), and
otherwise fetched from the Hub repo the manifest names as `source_repo` (offline, that fails cleanly for that entry);
an entry's source may also be an explicit `hf://owner/name[/file]`. Entry names are plain folder names (checked when
the manifest is read), so every output lands directly inside --output-root.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .pipeline import STEPS, convert_checkpoint
from .releases import ManifestEntry, load_manifest


@dataclass
class EntryResult:
    name: str
    status: str  # "ok" (converted), "exists" (kept from an earlier run), "pushed" or "failed"
    seconds: float
    num_parameters: int | None = None
    output_dir: Path | None = None
    url: str | None = None
    error: str = ""


def resolve_source(entry: ManifestEntry, source_dir: Path | None, source_repo: str | None) -> str:
    """A local path when the source is there, else the Hub reference `hf://source_repo/file` (the entry's own
    source_repo, else the manifest's; with neither, the missing local path, which the converter reports)."""
    if entry.source.startswith("hf://"):
        return entry.source
    candidates = []
    if Path(entry.source).is_absolute():
        candidates.append(Path(entry.source))
    elif source_dir is not None:
        candidates.append(source_dir / entry.source)
        if entry.release is not None and entry.release.remote_code_repo:  # a downloaded remote-code repo folder
            candidates.append(source_dir / entry.release.remote_code_repo.split("/")[-1])
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    source_repo = entry.source_repo or source_repo
    if Path(entry.source).is_absolute() or not source_repo:
        return str(candidates[0]) if candidates else entry.source  # the converter says "no such file"
    return f"hf://{source_repo.removeprefix('hf://')}/{entry.source}"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def convert_all(
    manifest: str | os.PathLike,
    *,
    source_dir: str | os.PathLike | None = None,
    output_root: str | os.PathLike = "converted",
    push: bool = False,
    only: list[str] | None = None,
    org: str | None = None,
    overwrite: bool = False,
    skip_existing: bool = False,
    trust_pickle: bool = False,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: str | None = None,
    api=None,
    stream: TextIO | None = None,
) -> list[EntryResult]:
    """Convert every (or every `only`-named) entry of a manifest; returns one result per entry, in order."""
    from tqdm.auto import tqdm

    from .errors import ConversionError
    from .hub import push_folder
    from .pipeline import DEFAULT_MAX_SHARD_SIZE

    data, entries = load_manifest(manifest, org=org)
    if only:
        wanted = [name.strip() for item in only for name in item.split(",") if name.strip()]
        unknown = sorted(set(wanted) - {e.name for e in entries})
        if unknown:
            raise ValueError(
                f"--only names not in the manifest: {', '.join(unknown)} (it has {', '.join(e.name for e in entries)})"
            )
        entries = [e for e in entries if e.name in wanted]
    source_repo = data.get("source_repo")
    source_dir = Path(source_dir) if source_dir is not None else None
    output_root = Path(output_root)
    root = output_root.resolve()
    for entry in entries:  # load_manifest checked the names; make sure before anything is written
        if (output_root / entry.name).resolve().parent != root:
            raise ValueError(f"entry {entry.name!r} would be written outside --output-root {output_root}")
    results = []
    for entry in entries:
        steps = STEPS + (("push",) if push else ())
        bar = tqdm(total=len(steps), desc=entry.name, unit="step", file=stream or sys.stderr, leave=True)

        def progress(step: str, bar=bar) -> None:
            bar.set_postfix_str(step)
            if step != STEPS[0]:
                bar.update(1)

        start = time.perf_counter()
        output_dir = output_root / entry.name
        result = EntryResult(entry.name, "failed", 0.0, output_dir=output_dir)

        def upload(folder: Path, result=result, entry=entry, bar=bar) -> None:
            bar.set_postfix_str("push")
            result.url = push_folder(
                folder,
                entry.repo_id,
                private=private,
                revision=revision,
                create_pr=create_pr,
                commit_message=f"Add {entry.name} (converted from {Path(entry.source).name} with internimage_hf)",
                api=api,
            )
            bar.update(1)
            result.status = "pushed"

        try:
            if skip_existing and (output_dir / "config.json").is_file():
                # converted by an earlier run (folders only appear when complete)
                card = output_dir / "README.md"
                if push and (not card.is_file() or f'model="{entry.repo_id}"' not in card.read_text()):
                    raise ValueError(
                        f"{output_dir} was converted for another repo id than {entry.repo_id} (see its "
                        f"README.md); convert it again with --overwrite"
                    )
                bar.update(len(STEPS))
                result.status = "exists"
                if push:
                    upload(output_dir)
                continue
            converted = convert_checkpoint(
                resolve_source(entry, source_dir, source_repo),
                output_dir,
                variant=entry.variant if entry.official_config is None else None,
                official_config=entry.official_config,
                overwrite=overwrite,
                trust_pickle=trust_pickle,
                use_ema=entry.use_ema,
                labels=entry.labels,
                image_size=entry.image_size,
                release=entry.release,
                expected=entry.expected,
                tolerance=entry.tolerance,
                max_shard_size=max_shard_size or DEFAULT_MAX_SHARD_SIZE,
                model_id=entry.repo_id,
                base_model=entry.base_model,
                progress=progress,
            )
            bar.update(1)
            result.num_parameters = converted.num_parameters
            result.status = "ok"
            if push:
                upload(converted.output_dir)
        except Exception as error:  # one entry's failure, whatever it is, must not stop the others
            result.error = (
                _one_line(error)
                if isinstance(error, (ConversionError, OSError, ValueError))
                else f"{type(error).__name__}: {_one_line(error)}"
            )
            bar.set_postfix_str("failed")
        finally:
            result.seconds = time.perf_counter() - start
            bar.close()
            results.append(result)
    return results


def summary_table(results: list[EntryResult]) -> str:
    """Plain-text table: name, status, seconds, params, error."""
    rows = [("name", "status", "seconds", "params", "error")]
    for r in results:
        params = "" if r.num_parameters is None else f"{r.num_parameters / 1e6:.2f}M"
        rows.append((r.name, r.status, f"{r.seconds:.1f}", params, r.error))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4])
        if index == 0:
            lines.append("  ".join("-" * width for width in widths) + "  " + "-" * 5)
    return "\n".join(line.rstrip() for line in lines)
