"""Official checkpoint -> verified, documented `save_pretrained` folder.

Steps: read the source (local file or folder, or an explicit `hf://` Hub reference; hashed; every tensor checked),
rename keys (the one mapping, `keys.KEY_RULES`), plan (detect the variant, pick config, labels,
resolution, release), build the model strictly (on the meta device, tensors assigned, no second copy), verify
against expected outputs when given, render the card, save atomically.
`plan_conversion` needs shapes only, so it runs on meta-device state dicts of the real sizes.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..configuration_internimage import InternImageConfig, official_variant, official_variant_names
from ..labels import IMAGENET_1K, IMAGENET_22K, imagenet_labels
from ..utils import relative_error
from .detect import (
    Architecture,
    architecture_from_config,
    architecture_from_state_dict,
    check_variant,
    match_variant,
    normalize_variant,
    variant_title,
)
from .errors import ConversionError, PickleRefused, format_keys
from .keys import convert_official_state_dict
from .output import save_atomically
from .releases import RELEASES_BY_NAME, Release, get_release
from .source import check_tensors, load_official_source, read_official_config, weight_files

STEPS = ("read", "detect", "load", "verify", "save")
DEFAULT_TOLERANCE = 1e-4
DEFAULT_MAX_SHARD_SIZE = "5GB"
PRETRAIN_22K_SIZE = 384  # every 22k-class release was evaluated at 384


# ---------------------------------------------------------------------------------------------- source
@dataclass
class SourceInfo:
    label: str  # what was given: a path or a Hub reference
    files: list[tuple[str, str]] = field(default_factory=list)  # (weight file name, sha256)
    commit: str | None = None  # Hub commit of a downloaded source
    use_ema: bool = False


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_source(
    source: str | os.PathLike, *, trust_pickle: bool = False, use_ema: bool = False, revision: str | None = None
) -> tuple[dict, InternImageConfig | None, SourceInfo]:
    """(official state dict, config the source carries or None, SourceInfo).

    A source is a local file or folder, or a Hub reference written `hf://owner/name[/file]` (downloaded first). A
    local path that does not exist is an error, never a Hub lookup. `trust_pickle` applies to a local file only:
    a downloaded `.pth` is always read with `weights_only=True`. Every tensor is checked (`check_tensors`)."""
    from .hub import HUB_SCHEME, download_source, parse_hub_reference

    text = str(source)
    hub = text.startswith(HUB_SCHEME)
    if hub:
        if parse_hub_reference(text) is None:
            raise ConversionError(
                f"{text}: not a Hub reference of the form {HUB_SCHEME}owner/name or {HUB_SCHEME}owner/name/path/to/file"
            )
        path, commit = download_source(text, revision=revision)
    else:
        path, commit = Path(source), None
        if not path.exists():
            hint = ""
            if not text.startswith((".", "/", "~")) and text.count("/") >= 1 and "\\" not in text:
                hint = f" (a Hugging Face Hub source is written {HUB_SCHEME}{text})"
            raise ConversionError(f"{text}: no such file or folder{hint}")
    try:
        state_dict, config = load_official_source(path, trust_pickle=trust_pickle and not hub, use_ema=use_ema)
    except PickleRefused:
        if not hub:
            raise
        raise ConversionError(
            f"{text} holds Python objects besides tensors; refusing to unpickle a downloaded file "
            f"(--trust-pickle applies only to a local file you name: download it, check it, and "
            f"convert the local copy)"
        ) from None
    check_tensors(state_dict, text if hub else Path(source).name)
    files = weight_files(path)[0] if path.is_dir() else [path]
    # a local path is named by its last component only: the card is public, the folder layout is not
    label = text if hub else Path(source).name
    info = SourceInfo(label=label, files=[(f.name, sha256_file(f)) for f in files], commit=commit, use_ema=use_ema)
    return state_dict, config, info


# ---------------------------------------------------------------------------------------------- plan
@dataclass
class ConversionPlan:
    """What will be built: config (labels and image_size set), the official variant and release if identified."""

    config: InternImageConfig
    architecture: Architecture | None  # read from the weights (None if they are not InternImage-shaped)
    variant: str | None  # the official variant the config is, or None for a custom architecture
    release: Release | None
    image_size: int
    labels: str  # "imagenet-1k" | "imagenet-22k" | "custom" | "generic"

    @property
    def title(self) -> str:
        if self.variant:
            return variant_title(self.variant)
        family = "FlashInternImage" if self.config.core_op == "DCNv4" else "InternImage"
        return f"{family} (custom configuration)"

    def architecture_text(self) -> str:
        c = self.config
        text = (
            f"channels {c.channels}, depths {'-'.join(map(str, c.depths))}, groups "
            f"{'-'.join(map(str, c.groups))}, offset scale {c.offset_scale:g}, "
        )
        if c.core_op == "DCNv4":
            text += "DCNv4, " + (
                f"depthwise kernel {c.dw_kernel_size} before offset_mask" if c.dw_kernel_size else "no depthwise conv"
            )
            text += ", output_proj bias" if c.dcn_output_bias else ""
            text += ", mlp.fc2 bias" if c.mlp_fc2_bias else ""
        else:
            text += f"DCNv3 depthwise kernel {c.dw_kernel_size}"
        if c.layer_scale is not None:
            text += ", layer scale"
        if c.post_norm:
            text += ", post-norm"
        if c.res_post_norm and c.layer_scale is None and not c.post_norm:
            text += ", res-post-norm"
        if c.center_feature_scale:
            text += ", center feature scale"
        text += ", attention-pooling head" if c.use_clip_projector else ", conv head"
        return (f"{self.title}: " if self.variant else "") + text


def apply_labels(config: InternImageConfig, labels: str = "auto") -> str:
    """Set id2label: ImageNet names for 1000/21841-class heads ("auto"), LABEL_i ("none"), or a JSON/text file."""
    count = config.num_labels

    def set_names(names: dict[int, str]) -> None:
        config.id2label = dict(names)
        config.label2id = {name: index for index, name in names.items()}

    generic = all(str(v) == f"LABEL_{k}" for k, v in config.id2label.items())
    mode = str(labels).lower()
    if mode in ("auto", "imagenet"):
        names = imagenet_labels(count)
        if names is None:
            if mode == "imagenet":
                raise ConversionError(
                    f"--labels imagenet needs a {IMAGENET_1K}- or {IMAGENET_22K}-class head; "
                    f"this checkpoint has {count} classes"
                )
            return "generic" if generic else "custom"
        if mode == "auto" and not generic:
            return "custom"  # the source's own names win
        set_names(names)
        return "imagenet-1k" if count == IMAGENET_1K else "imagenet-22k"
    if mode == "none":
        set_names({i: f"LABEL_{i}" for i in range(count)})
        return "generic"
    path = Path(labels)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        reason = error.strerror or str(error)
        raise ConversionError(
            f"--labels {labels}: not 'auto', 'imagenet', 'none' or a readable file ({reason})"
        ) from None
    except UnicodeDecodeError as error:
        raise ConversionError(
            f"--labels {labels}: not a UTF-8 text file ({error.reason} at byte {error.start})"
        ) from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConversionError(f"--labels {labels}: not valid JSON ({error})") from None
        shape = 'a JSON labels file is a list of class names or an object {"0": name, ...}'
        if isinstance(data, list):
            names = dict(enumerate(data))
        elif isinstance(data, dict):
            try:
                names = {int(k): v for k, v in data.items()}
            except ValueError:
                raise ConversionError(f"--labels {labels}: {shape}; its keys must be class indices") from None
        else:
            raise ConversionError(f"--labels {labels}: {shape}, not a {type(data).__name__}")
        if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in names.values()):
            raise ConversionError(f"--labels {labels}: {shape}; the class names must be strings")
    else:
        names = dict(enumerate(line.strip() for line in text.splitlines() if line.strip()))
    if sorted(names) != list(range(count)):
        raise ConversionError(f"--labels {labels} has {len(names)} names; the head has {count} classes")
    set_names({i: str(names[i]) for i in range(count)})
    return "custom"


def resolve_image_size(
    variant: str | None, num_labels: int, release: Release | None, override: int | None, config: InternImageConfig
) -> int:
    """--image-size, else the release's eval resolution, else 384 for 22k heads (every 22k release's) or the
    variant's eval resolution, else the config's."""
    if override:
        size = int(override)
    elif release is not None:
        size = release.image_size
    elif variant is not None:
        size = PRETRAIN_22K_SIZE if num_labels == IMAGENET_22K else official_variant(variant)["eval_size"]
    else:
        size = config.image_size
    if size < 32:
        raise ConversionError(f"--image-size {size}: InternImage needs at least 32 pixels")
    if config.use_clip_projector and size % 32:
        raise ConversionError(f"--image-size {size}: InternImage-H/G inputs must be multiples of 32")
    return size


def plan_conversion(
    converted: Mapping[str, torch.Tensor],
    *,
    config: InternImageConfig | None = None,
    variant: str | None = None,
    source_config: InternImageConfig | None = None,
    labels: str = "auto",
    image_size: int | None = None,
    release: Release | str | None = None,
    source_name: str | None = None,
) -> ConversionPlan:
    """Decide what to build from converted key names and shapes (meta tensors are fine).

    Config precedence: `config` (from --official-config) > `variant` (checked against the weights: a different
    official variant is an error) > `source_config` (a remote-code repo's config.json) > detection.
    """
    try:
        architecture = architecture_from_state_dict(converted)
    except ConversionError:
        if config is None and variant is None and source_config is None:
            raise
        architecture = None  # strict loading will say what does not fit
    if config is not None:
        config = copy.deepcopy(config)
    elif variant is not None:
        name = check_variant(architecture, variant) if architecture else normalize_variant(variant)
        config = InternImageConfig.from_variant(name)
    elif source_config is not None:
        config = copy.deepcopy(source_config)
    else:
        name = match_variant(architecture)
        if name is None:
            raise ConversionError(
                f"unknown {'FlashInternImage' if architecture.core_op == 'DCNv4' else 'InternImage'} architecture "
                f"({architecture.describe()}): not one of the official variants "
                f"({', '.join(official_variant_names())}); pass --official-config FILE with its official "
                f"constructor arguments (or --variant NAME to force a variant)"
            )
        config = InternImageConfig.from_variant(name)
    head = converted.get("classifier.weight")
    if head is not None and head.shape[0] != config.num_labels:
        config.num_labels = int(head.shape[0])
    found = match_variant(architecture_from_config(config))
    if isinstance(release, str):
        try:
            release = get_release(release)
        except ValueError as error:
            raise ConversionError(str(error)) from None
    if release is not None:
        if release.variant != found or release.num_labels != config.num_labels:
            raise ConversionError(
                f"--release {release.name} is {variant_title(release.variant)} with {release.num_labels} classes, "
                f"but this checkpoint is {variant_title(found) if found else 'a custom InternImage'} with "
                f"{config.num_labels} classes"
            )
    elif found is not None:
        from .releases import find_release

        release = find_release(found, config.num_labels, source_name)
    size = resolve_image_size(found, config.num_labels, release, image_size, config)
    config.image_size = size
    label_kind = apply_labels(config, labels)
    return ConversionPlan(
        config=config, architecture=architecture, variant=found, release=release, image_size=size, labels=label_kind
    )


# ---------------------------------------------------------------------------------------------- build, verify
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
        problems.append(f"missing keys ({len(missing)}): {format_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {format_keys(unexpected)}")
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


def build_model(plan: ConversionPlan, converted: Mapping[str, torch.Tensor]):
    """The classifier with the converted tensors assigned (strict; built on the meta device, so no extra copy)."""
    from ..modeling_internimage import InternImageForImageClassification

    with torch.device("meta"):
        model = InternImageForImageClassification(plan.config)
    tensors = {k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v for k, v in converted.items()}
    try:
        load_converted_weights(model, tensors, assign=True)
    except ConversionError as error:
        if plan.architecture is not None and plan.variant and match_variant(plan.architecture) != plan.variant:
            raise ConversionError(
                f"state dict ({plan.architecture.short()}) does not fit {variant_title(plan.variant)}: {error}"
            ) from None
        raise
    return model.eval()


@dataclass
class Verification:
    num_tensors: int
    expected: str | None = None  # file name of the reference outputs
    errors: dict[str, float] = field(default_factory=dict)  # relative error per compared output
    tolerance: float | None = None

    @property
    def max_error(self) -> float | None:
        return max(self.errors.values()) if self.errors else None

    @property
    def passed(self) -> bool:
        return self.expected is None or all(e <= self.tolerance for e in self.errors.values())

    def errors_text(self) -> str:
        return ", ".join(f"{name} {value:.2e}" for name, value in self.errors.items())

    def sentence(self) -> str:
        if self.expected is None:
            return "none was run for this conversion (no reference outputs were given)."
        return (
            f"outputs on the inputs of `{self.expected}` match its reference outputs with relative errors "
            f"{self.errors_text()} (‖out − ref‖ / ‖ref‖, float32; tolerance {self.tolerance:g}): passed."
        )


def verify_expected(model, expected: str | os.PathLike, tolerance: float = DEFAULT_TOLERANCE) -> Verification:
    """Run `pixel_values` from an expected-outputs file; compare logits and stage1..4 (when present)."""
    from safetensors.torch import load_file

    path = Path(expected)
    try:
        reference = load_file(path)
    except Exception as error:
        raise ConversionError(f"--expected {path} is not a readable safetensors file: {error}") from None
    missing = [k for k in ("pixel_values", "logits") if k not in reference]
    if missing:
        raise ConversionError(f"--expected {path} lacks {', '.join(missing)} (needs pixel_values and logits)")
    with torch.no_grad():
        outputs = model(reference["pixel_values"].float(), output_hidden_states=True)
    results = {"logits": outputs.logits}
    for index in range(1, 5):
        if f"stage{index}" in reference:
            results[f"stage{index}"] = outputs.hidden_states[index]
    errors = {}
    for name, value in results.items():
        if tuple(value.shape) != tuple(reference[name].shape):
            raise ConversionError(
                f"verification against {path.name} failed: {name} has shape {tuple(value.shape)}, "
                f"expected {tuple(reference[name].shape)}"
            )
        errors[name] = relative_error(value, reference[name])
    result = Verification(num_tensors=0, expected=path.name, errors=errors, tolerance=float(tolerance))
    if not result.passed:
        raise ConversionError(
            f"verification against {path.name} failed: relative errors {result.errors_text()} "
            f"exceed the tolerance {tolerance:g}"
        )
    return result


# ---------------------------------------------------------------------------------------------- the whole run
@dataclass
class ConversionResult:
    output_dir: Path
    plan: ConversionPlan
    source: SourceInfo
    verification: Verification
    num_parameters: int
    card: str | None


def _versions() -> dict[str, str]:
    import transformers

    from .. import __version__

    return {
        "internimage_hf": __version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__.split("+")[0],
    }


def default_base_model(release: Release | None, model_id: str | None) -> str | None:
    """Where a fine-tune's card points: the base release under the same owner, else OpenGVLab's copy of it."""
    if release is None or not release.base:
        return None
    from .hub import is_repo_id

    if model_id and is_repo_id(model_id):
        return f"{model_id.split('/')[0]}/{release.base}"
    return RELEASES_BY_NAME[release.base].remote_code_repo


def card_facts(
    plan: ConversionPlan,
    source: SourceInfo,
    verification: Verification,
    num_parameters: int,
    model_id: str,
    base_model: str | None = None,
):
    from .card import CardFacts

    return CardFacts(
        model_id=model_id,
        title=plan.title,
        architecture=plan.architecture_text(),
        num_labels=plan.config.num_labels,
        labels=plan.labels,
        image_size=plan.image_size,
        num_parameters=num_parameters,
        source_label=source.label,
        source_files=list(source.files),
        source_commit=source.commit,
        use_ema=source.use_ema,
        release=plan.release,
        base_model=base_model if base_model is not None else default_base_model(plan.release, model_id),
        num_tensors=verification.num_tensors,
        verification=verification.sentence(),
        date=datetime.datetime.now(datetime.UTC).date().isoformat(),
        versions=_versions(),
        core_op=plan.config.core_op,
    )


def convert_checkpoint(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    variant: str | None = None,
    official_config: str | os.PathLike | None = None,
    overwrite: bool = False,
    trust_pickle: bool = False,
    use_ema: bool = False,
    labels: str = "auto",
    image_size: int | None = None,
    release: Release | str | None = None,
    expected: str | os.PathLike | None = None,
    tolerance: float | None = None,
    max_shard_size: str | int | None = DEFAULT_MAX_SHARD_SIZE,
    model_id: str | None = None,
    base_model: str | None = None,
    revision: str | None = None,
    write_card: bool = True,
    progress: Callable[[str], None] | None = None,
) -> ConversionResult:
    """Convert one checkpoint; raises ConversionError (one sentence) and leaves nothing behind on any failure."""
    step = progress or (lambda name: None)
    if variant and official_config:
        raise ConversionError("Give either --variant or --official-config, not both")
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:  # fail before the (possibly long) load
        raise ConversionError(f"{output_dir} already exists; choose another folder or pass --overwrite")
    config = read_official_config(official_config) if official_config else None  # before a long read
    step("read")
    state_dict, source_config, source_info = read_source(
        source, trust_pickle=trust_pickle, use_ema=use_ema, revision=revision
    )
    converted = convert_official_state_dict(state_dict)
    del state_dict
    step("detect")
    plan = plan_conversion(
        converted,
        config=config,
        variant=variant,
        source_config=source_config,
        labels=labels,
        image_size=image_size,
        release=release,
        source_name=str(source),
    )
    step("load")
    model = build_model(plan, converted)
    del converted
    step("verify")
    if expected is not None:
        verification = verify_expected(model, expected, DEFAULT_TOLERANCE if tolerance is None else tolerance)
    else:
        verification = Verification(num_tensors=0)
    verification.num_tensors = len(model.state_dict())
    num_parameters = model.num_parameters()
    card = None
    if write_card:
        from .card import render_card

        card = render_card(
            card_facts(plan, source_info, verification, num_parameters, model_id or str(output_dir), base_model)
        )
    step("save")
    save_atomically(
        model, output_dir, image_size=plan.image_size, overwrite=overwrite, max_shard_size=max_shard_size, card=card
    )
    return ConversionResult(
        output_dir=output_dir,
        plan=plan,
        source=source_info,
        verification=verification,
        num_parameters=num_parameters,
        card=card,
    )


def model_from_official(state_dict: Mapping[str, torch.Tensor], config: InternImageConfig):
    """An InternImageForImageClassification holding the official weights (strict; head size and ImageNet names
    follow the checkpoint's head)."""
    converted = convert_official_state_dict(state_dict)
    return build_model(plan_conversion(converted, config=config), converted)


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
