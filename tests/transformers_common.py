"""transformers' own common model testers, for the installed transformers version.

They ship in transformers' source distribution on PyPI (tests/*.py), not in its wheel. The first run downloads that
sdist with pip (PyPI only: never the Hugging Face Hub), extracts the top-level test modules into
~/.cache/internimage_hf/transformers-tests/<version>/hf_common_tests/ (or $INTERNIMAGE_TRANSFORMERS_TESTS/<version>)
together with the stand-ins in tests/hf_shims (see its README), and later runs reuse it. A failure to get them is an
error, never a skip: the conformity tests must run.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

PACKAGE = "hf_common_tests"
SHIMS = Path(__file__).resolve().parent / "hf_shims"


def _cache_root() -> Path:
    base = os.environ.get("INTERNIMAGE_TRANSFORMERS_TESTS")
    root = Path(base) if base else Path.home() / ".cache" / "internimage_hf" / "transformers-tests"
    return root / transformers.__version__


def _extract(sdist: Path, destination: Path) -> None:
    """The sdist's top-level tests/*.py into destination/, plus the shims."""
    destination.mkdir(parents=True)
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            parts = Path(member.name).parts
            if len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py") and member.isfile():
                source = archive.extractfile(member)
                (destination / parts[2]).write_bytes(source.read())
    (destination / "__init__.py").touch()
    for folder in ("exporters", "generation", "utils"):
        shutil.copytree(SHIMS / folder, destination / folder)


def common_tests_dir() -> Path:
    """The folder holding the `hf_common_tests` package for the installed transformers (fetched once)."""
    root = _cache_root()
    if (root / PACKAGE / "test_modeling_common.py").is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"transformers=={transformers.__version__}",
            "-d",
            tmp,
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        sdists = list(Path(tmp).glob("transformers-*.tar.gz"))
        if done.returncode != 0 or not sdists:
            raise RuntimeError(
                f"could not download transformers {transformers.__version__}'s source distribution from PyPI to get "
                f"its common model testers ({' '.join(command)}): {done.stderr.strip()[-800:]}"
            )
        staging = Path(tmp) / PACKAGE
        _extract(sdists[0], staging)
        try:
            staging.rename(root / PACKAGE)  # atomic; a concurrent run may have won the race
        except OSError:
            if not (root / PACKAGE / "test_modeling_common.py").is_file():
                raise
    return root


def load(module: str):
    """Import `hf_common_tests.<module>` (e.g. "test_modeling_common")."""
    root = str(common_tests_dir())
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(f"{PACKAGE}.{module}")
