"""The official classification releases (11 InternImage, 4 FlashInternImage) and the publishing manifest.

`RELEASES` is the package's record of what OpenGVLab published for InternImage: which `.pth` in the Hub repo
`OpenGVLab/InternImage`, which architecture and head, the evaluation resolution, and the officially reported top-1 /
parameters / FLOPs. `FLASH_RELEASES` is the same for FlashInternImage (DCNv4, Hub repo `OpenGVLab/DCNv4`, figures
from that repository's README); `ALL_RELEASES` is both. `conversion/manifest.json` (repository root) is
`build_manifest()` written out; a test keeps the two identical.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from ..labels import IMAGENET_1K, IMAGENET_22K

OFFICIAL_REPO = "OpenGVLab/InternImage"
FLASH_REPO = "OpenGVLab/DCNv4"
DEFAULT_ORG = "internimage-hf"
HEADS = {"1k": IMAGENET_1K, "22k": IMAGENET_22K}


@dataclass(frozen=True)
class Release:
    """One official checkpoint. `name` is also the name of its converted Hub repo."""

    name: str
    variant: str
    head: str  # "1k" (1000 ImageNet-1k classes) or "22k" (21841 ImageNet-22k classes)
    image_size: int
    source_file: str  # file name in the Hub repo `source_repo`
    remote_code_repo: str | None  # OpenGVLab's trust_remote_code repo holding the same weights (none for Flash)
    training: str  # one sentence on the data it was trained on
    top1: float | None = None  # official ImageNet-1k top-1 (%), 1k heads only
    params: str | None = None  # as reported officially
    flops: str | None = None  # as reported officially, at `image_size`
    base: str | None = None  # name of the release this one was fine-tuned from
    source_repo: str = OFFICIAL_REPO  # the Hub repo holding `source_file`
    pretrained_22k: bool = False  # a 1k head fine-tuned from ImageNet-22k weights that are not a release here

    @property
    def num_labels(self) -> int:
        return HEADS[self.head]

    @property
    def datasets(self) -> list[str]:
        """Hub `datasets` metadata: what the weights were trained on."""
        if self.head == "22k":
            return ["imagenet-21k"]
        return ["imagenet-21k", "imagenet-1k"] if self.base or self.pretrained_22k else ["imagenet-1k"]

    @property
    def family(self) -> str:
        """ "FlashInternImage" (DCNv4) or "InternImage" (DCNv3)."""
        return "FlashInternImage" if self.variant.startswith("flash_") else "InternImage"

    def matches_source(self, source_name: str) -> bool:
        """Whether a file/folder/repo name refers to this release (`internimage_t_1k_224.pth`, repo ids, ...)."""
        stem = Path(str(source_name).rstrip("/")).name
        for suffix in (".pth", ".pt", ".bin", ".safetensors"):
            stem = stem.removesuffix(suffix)
        stem = stem.lower().replace("-", "_")
        names = {Path(self.source_file).stem, self.name.replace("-", "_")}
        if self.remote_code_repo:
            names.add(self.remote_code_repo.split("/")[-1].lower())
        return stem in names


_IN1K = "ImageNet-1k (1.28M images), 300 epochs at 224x224"
_IN22K_LXL = "ImageNet-22k (14M images, 21841 classes), pretrained at 192x192 and fine-tuned at 384x384"
_JOINT = "a joint public dataset of 427M images, then ImageNet-22k (21841 classes) at 384x384"

RELEASES: tuple[Release, ...] = (
    Release(
        "internimage-t-1k-224",
        "t",
        "1k",
        224,
        "internimage_t_1k_224.pth",
        "OpenGVLab/internimage_t_1k_224",
        _IN1K,
        top1=83.5,
        params="30M",
        flops="5G",
    ),
    Release(
        "internimage-s-1k-224",
        "s",
        "1k",
        224,
        "internimage_s_1k_224.pth",
        "OpenGVLab/internimage_s_1k_224",
        _IN1K,
        top1=84.2,
        params="50M",
        flops="8G",
    ),
    Release(
        "internimage-b-1k-224",
        "b",
        "1k",
        224,
        "internimage_b_1k_224.pth",
        "OpenGVLab/internimage_b_1k_224",
        _IN1K,
        top1=84.9,
        params="97M",
        flops="16G",
    ),
    Release(
        "internimage-l-22k-384",
        "l",
        "22k",
        384,
        "internimage_l_22k_192to384.pth",
        "OpenGVLab/internimage_l_22k_384",
        _IN22K_LXL,
    ),
    Release(
        "internimage-l-22kto1k-384",
        "l",
        "1k",
        384,
        "internimage_l_22kto1k_384.pth",
        "OpenGVLab/internimage_l_22kto1k_384",
        "ImageNet-22k pretraining, then ImageNet-1k fine-tuning at 384x384",
        top1=87.7,
        params="223M",
        flops="108G",
        base="internimage-l-22k-384",
    ),
    Release(
        "internimage-xl-22k-384",
        "xl",
        "22k",
        384,
        "internimage_xl_22k_192to384.pth",
        "OpenGVLab/internimage_xl_22k_384",
        _IN22K_LXL,
    ),
    Release(
        "internimage-xl-22kto1k-384",
        "xl",
        "1k",
        384,
        "internimage_xl_22kto1k_384.pth",
        "OpenGVLab/internimage_xl_22kto1k_384",
        "ImageNet-22k pretraining, then ImageNet-1k fine-tuning at 384x384",
        top1=88.0,
        params="335M",
        flops="163G",
        base="internimage-xl-22k-384",
    ),
    Release(
        "internimage-h-jointto22k-384",
        "h",
        "22k",
        384,
        "internimage_h_jointto22k_384.pth",
        "OpenGVLab/internimage_h_jointto22k_384",
        _JOINT,
    ),
    Release(
        "internimage-h-22kto1k-640",
        "h",
        "1k",
        640,
        "internimage_h_22kto1k_640.pth",
        "OpenGVLab/internimage_h_22kto1k_640",
        "joint 427M-image + ImageNet-22k pretraining, then ImageNet-1k fine-tuning at 640x640",
        top1=89.6,
        params="1.08B",
        flops="1478G",
        base="internimage-h-jointto22k-384",
    ),
    Release(
        "internimage-g-jointto22k-384",
        "g",
        "22k",
        384,
        "internimage_g_pretrainto22k_384.pth",
        "OpenGVLab/internimage_g_jointto22k_384",
        _JOINT,
    ),
    Release(
        "internimage-g-22kto1k-512",
        "g",
        "1k",
        512,
        "internimage_g_22kto1k_512.pth",
        "OpenGVLab/internimage_g_22kto1k_512",
        "joint 427M-image + ImageNet-22k pretraining, then ImageNet-1k fine-tuning at 512x512",
        top1=90.1,
        params="3B",
        flops="2700G",
        base="internimage-g-jointto22k-384",
    ),
)

# FlashInternImage: the classification checkpoints of the OpenGVLab/DCNv4 README ("Released Models"); top-1 and
# parameters as listed there (no FLOPs are listed). The L file name spells "internimage" without the underscore.
_FLASH_IN1K = "ImageNet-1k (1.28M images) at 224x224"
FLASH_RELEASES: tuple[Release, ...] = (
    Release(
        "flash-internimage-t-1k-224",
        "flash_t",
        "1k",
        224,
        "flash_intern_image_t_1k_224.pth",
        None,
        _FLASH_IN1K,
        top1=83.6,
        params="30M",
        source_repo=FLASH_REPO,
    ),
    Release(
        "flash-internimage-s-1k-224",
        "flash_s",
        "1k",
        224,
        "flash_intern_image_s_1k_224.pth",
        None,
        _FLASH_IN1K,
        top1=84.4,
        params="50M",
        source_repo=FLASH_REPO,
    ),
    Release(
        "flash-internimage-b-1k-224",
        "flash_b",
        "1k",
        224,
        "flash_intern_image_b_1k_224.pth",
        None,
        _FLASH_IN1K,
        top1=84.9,
        params="97M",
        source_repo=FLASH_REPO,
    ),
    Release(
        "flash-internimage-l-22kto1k-384",
        "flash_l",
        "1k",
        384,
        "flash_internimage_l_22kto1k_384.pth",
        None,
        "ImageNet-22k pretraining, then ImageNet-1k fine-tuning at 384x384",
        top1=88.1,
        params="223M",
        source_repo=FLASH_REPO,
        pretrained_22k=True,
    ),
)
ALL_RELEASES: tuple[Release, ...] = RELEASES + FLASH_RELEASES
RELEASES_BY_NAME = {release.name: release for release in ALL_RELEASES}


def get_release(name: str) -> Release:
    """A release by name (`internimage-t-1k-224`; underscores and a `.pth` suffix are accepted too)."""
    for release in ALL_RELEASES:
        if release.name == name or release.matches_source(name):
            return release
    raise ValueError(f"Unknown official release {name!r}; known: {', '.join(RELEASES_BY_NAME)}")


def find_release(variant: str | None, num_labels: int, source_name: str | None = None) -> Release | None:
    """The official release with this architecture and head: the one the source is named after, else the only one.

    A name that points at a release of another architecture or head is ignored (a renamed file must not borrow
    another model's figures); then the (variant, head) pair decides, which is unique among the releases.
    """
    candidates = [r for r in ALL_RELEASES if r.variant == variant and r.num_labels == num_labels]
    if source_name:
        named = [r for r in candidates if r.matches_source(source_name)]
        if named:
            return named[0]
    return candidates[0] if len(candidates) == 1 else None


# ---------------------------------------------------------------------------------------------- manifest
MANIFEST_VERSION = 1


def build_manifest(org: str = DEFAULT_ORG) -> dict:
    """The publishing manifest for every official release (what `conversion/manifest.json` holds). An entry whose
    file lives in another Hub repo than the manifest's `source_repo` (FlashInternImage: OpenGVLab/DCNv4) names its
    own `source_repo`."""
    entries = []
    for release in ALL_RELEASES:
        own_repo = {"source_repo": f"hf://{release.source_repo}"} if release.source_repo != OFFICIAL_REPO else {}
        entries.append(
            {
                "name": release.name,
                "source": release.source_file,
                **own_repo,
                "remote_code_repo": release.remote_code_repo,
                "variant": release.variant,
                "head": release.head,
                "num_labels": release.num_labels,
                "image_size": release.image_size,
                "repo_id": f"{{org}}/{release.name}",
                "base_model": f"{{org}}/{release.base}" if release.base else None,
                "base_model_relation": "finetune" if release.base else None,
                "training": release.training,
                "official": {"top1": release.top1, "params": release.params, "flops": release.flops},
            }
        )
    return {"version": MANIFEST_VERSION, "org": org, "source_repo": f"hf://{OFFICIAL_REPO}", "entries": entries}


def manifest_text(org: str = DEFAULT_ORG) -> str:
    return json.dumps(build_manifest(org), indent=2) + "\n"


# An entry's name is the name of its output folder under --output-root (and of its Hub repo): a plain name, so that
# it can never point outside the output root (no '/', '\\', '..', NUL, absolute paths, leading dots or spaces).
_ENTRY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def check_entry_name(name) -> str | None:
    """None if `name` can be an output folder name, else why not."""
    if not isinstance(name, str):
        return f"is not a string ({type(name).__name__})"
    if not _ENTRY_NAME.match(name) or name.endswith("."):
        return (
            "is not a plain folder name: use 1-96 letters, digits, '.', '_' or '-', starting with a letter or "
            "digit (no '/', no '..')"
        )
    return None


@dataclass
class ManifestEntry:
    """One checkpoint to convert: where it comes from, where it goes, what is known about it."""

    name: str
    source: str
    repo_id: str
    release: Release | None
    variant: str | None = None
    source_repo: str | None = None  # the entry's own Hub repo (overrides the manifest's source_repo)
    official_config: Path | None = None
    expected: Path | None = None
    tolerance: float | None = None
    image_size: int | None = None
    labels: str = "auto"
    base_model: str | None = None
    use_ema: bool = False


def load_manifest(path: str | os.PathLike, org: str | None = None) -> tuple[dict, list[ManifestEntry]]:
    """Read and validate a manifest; `{org}` in repo ids is replaced by `org` (default: the manifest's own)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a readable manifest: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise ValueError(f"{path}: a manifest is a JSON object with an 'entries' list")
    org = org or data.get("org") or DEFAULT_ORG
    base_dir = path.parent

    def local(value):
        return None if value is None else (base_dir / value if not Path(value).is_absolute() else Path(value))

    def check_repo(source_repo, where: str):
        from .hub import is_repo_id

        if source_repo is not None and (
            not isinstance(source_repo, str) or not is_repo_id(source_repo.removeprefix("hf://"))
        ):
            raise ValueError(f"{path}: {where}source_repo {source_repo!r} is not a Hub repo id (hf://owner/name)")

    check_repo(data.get("source_repo"), "")
    entries, seen = [], set()
    for number, raw in enumerate(data["entries"], 1):
        if not isinstance(raw, dict) or "name" not in raw or not raw.get("source"):
            raise ValueError(f"{path}: entry {number} needs at least 'name' and 'source'")
        problem = check_entry_name(raw["name"])
        if problem:
            raise ValueError(
                f"{path}: entry {number}'s name {raw['name']!a} {problem}; it names the entry's "
                f"output folder under --output-root"
            )
        if not isinstance(raw["source"], str) or "\0" in raw["source"]:
            raise ValueError(f"{path}: entry {number}'s source {raw['source']!a} is not a path or hf:// reference")
        check_repo(raw.get("source_repo"), f"entry {number}'s ")
        name = str(raw["name"])
        if name in seen:
            raise ValueError(f"{path}: two entries are named {name!r}")
        seen.add(name)
        release = RELEASES_BY_NAME.get(name)
        if release is not None:
            for key, known in (("variant", release.variant), ("head", release.head)):
                if raw.get(key) is not None and str(raw[key]) != known:
                    raise ValueError(f"{path}: entry {name!r} says {key} {raw[key]!r}, but that release is {known!r}")
            official = raw.get("official") or {}
            release = replace(
                release,
                image_size=int(raw.get("image_size") or release.image_size),
                training=str(raw.get("training") or release.training),
                top1=official.get("top1", release.top1),
                params=official.get("params", release.params),
                flops=official.get("flops", release.flops),
            )
        repo_id = str(raw.get("repo_id") or f"{{org}}/{name}").replace("{org}", org)
        base_model = raw.get("base_model")
        entries.append(
            ManifestEntry(
                name=name,
                source=str(raw["source"]),
                repo_id=repo_id,
                release=release,
                variant=raw.get("variant"),
                source_repo=raw.get("source_repo"),
                official_config=local(raw.get("official_config")),
                expected=local(raw.get("expected")),
                tolerance=raw.get("tolerance"),
                image_size=raw.get("image_size"),
                labels=str(raw.get("labels", "auto")),
                base_model=base_model.replace("{org}", org) if base_model else None,
                use_ema=bool(raw.get("use_ema", False)),
            )
        )
    return data, entries
