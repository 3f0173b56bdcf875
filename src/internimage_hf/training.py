"""Fine-tuning helpers shared by the demo, the examples and user code.

- `layer_decay_param_groups`: the official layer-wise learning-rate decay recipe as optimizer parameter groups.
- `InternImageTrainer`: `transformers.Trainer` whose optimizer uses those groups (works with DDP and FSDP, where
  passing `optimizers=` to `Trainer` is not allowed).
- `image_classification_transform`, `collate_image_classification`, `compute_accuracy`: the data plumbing between a
  `datasets` image data set, an image processor and `Trainer`.
- `load_model_and_processor`: a model from a `save_pretrained` folder / Hub id, or randomly initialised from a preset.
- `make_synthetic_image_folder`: a small learnable image-folder data set (examples and tests run without downloads).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import Trainer

from .modeling_internimage import InternImageDCNv3, InternImageDCNv4, InternImageEmbeddings, InternImageEncoder


def _trunk_depth_ids(model: nn.Module) -> dict[int, int]:
    """id(parameter) -> depth id for the trunk of every InternImage inside `model` (see `parameter_depth_ids`)."""
    ids: dict[int, int] = {}
    for owner in model.modules():
        encoder, stem = getattr(owner, "encoder", None), getattr(owner, "embeddings", None)
        if not isinstance(encoder, InternImageEncoder):
            continue
        depths = [len(level.layers) for level in encoder.levels]
        total = sum(depths)

        def block_id(level: int, block: int, depths=depths, total=total) -> int:
            return total - 1 - (sum(depths[:level]) + block)

        def assign(module: nn.Module | None, depth: int) -> None:
            if module is not None:
                ids.update((id(p), depth) for p in module.parameters())

        if isinstance(stem, InternImageEmbeddings):
            assign(stem, total - 1)
        for index, level in enumerate(encoder.levels):
            for block, layer in enumerate(level.layers):
                assign(layer, block_id(index, block))
            for norm, block in zip(level.post_norms or (), level.post_norm_ids):
                assign(norm, block_id(index, block))
            after = block_id(index + 1, 0) if index + 1 < len(depths) else 0
            assign(level.norm, after)
            assign(level.downsample, after)
    return ids


def parameter_depth_ids(model: nn.Module) -> dict[str, int]:
    """Depth id of every trainable parameter, counted from the head (the official `lr_decay_keywards`).

    The last block has id 0 and every earlier block one more; the stem shares the id of the first block (the
    deepest decay); a level's downsample and norm share the id of the next level's first block, and the last
    level's norm gets 0. Level-2 post-norms (H/G) share the id of the block they follow (the official code misses
    them, leaving them at full LR). Everything outside an InternImage trunk (heads, necks, decoders) gets 0.
    Works on any model containing InternImage modules: classifier, backbone, UperNet, DDP/FSDP-wrapped.
    """
    ids = _trunk_depth_ids(model)
    return {name: ids.get(id(p), 0) for name, p in model.named_parameters()}


def _dcn_lr_mul_ids(model: nn.Module) -> set[int]:
    """Parameters the official recipes multiply by `dcn_lr_mul` (names containing "offset" or the centre gate's):
    DCNv3 offset predictors and H/G centre gates; DCNv4's offset_mask Linear and the depthwise conv before it."""
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, InternImageDCNv3):
            subs = (module.offset, module.center_feature_scale_proj)
        elif isinstance(module, InternImageDCNv4):
            subs = (module.offset_mask, module.offset_mask_dw)
        else:
            continue
        for sub in subs:
            if sub is not None:
                ids.update(id(p) for p in sub.parameters())
    return ids


def no_weight_decay(name: str, param: torch.Tensor, keywords: Iterable[str] = ()) -> bool:
    """Official rule: no weight decay on 1-d parameters (norms, biases, layer scales) and on `.bias`."""
    return param.ndim <= 1 or name.endswith(".bias") or any(k in name for k in keywords)


def layer_decay_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    layer_decay: float = 0.9,
    dcn_lr_mul: float | None = None,
    no_weight_decay_keywords: Iterable[str] = (),
) -> list[dict]:
    """Optimizer parameter groups with the official layer-wise learning-rate decay (InternImage fine-tuning recipe).

    A trunk parameter at depth id `d` (see `parameter_depth_ids`) gets `lr * layer_decay ** d`; the head and any
    non-InternImage module get `lr`. With `dcn_lr_mul` (official fine-tunes use 0.1) the DCNv3 offset predictor and
    centre-feature-scale gate are further multiplied. Weight decay is 0 for norms, biases and layer scales
    (`no_weight_decay`). `layer_decay=1.0` gives a single LR with the official weight-decay split.

    Use with any torch optimizer (`torch.optim.AdamW(groups)`) or through `InternImageTrainer(layer_decay=...)`.
    Each group also carries `param_names` and `lr_scale` (its LR relative to `lr`) for inspection.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    keywords = tuple(no_weight_decay_keywords)
    depth_ids = _trunk_depth_ids(model)
    dcn_ids = _dcn_lr_mul_ids(model) if dcn_lr_mul is not None else set()
    groups: dict[tuple[float, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        scale = layer_decay ** depth_ids.get(id(param), 0)
        if id(param) in dcn_ids:
            scale *= dcn_lr_mul
        decay = 0.0 if no_weight_decay(name, param, keywords) else weight_decay
        group = groups.setdefault(
            (scale, decay),
            {"params": [], "param_names": [], "lr": lr * scale, "weight_decay": decay, "lr_scale": scale},
        )
        group["params"].append(param)
        group["param_names"].append(name)
    return sorted(groups.values(), key=lambda g: (g["lr_scale"], g["weight_decay"]))


class InternImageTrainer(Trainer):
    """`Trainer` whose optimizer uses `layer_decay_param_groups` (official weight-decay split, optional LR decay).

    Extra keyword arguments: `layer_decay` (default 1.0: no decay) and `dcn_lr_mul` (default None). The optimizer
    class and its other settings (betas, eps, fused, ...) still come from `TrainingArguments.optim`.
    """

    def __init__(self, *args, layer_decay: float = 1.0, dcn_lr_mul: float | None = None, **kwargs):
        self.layer_decay = float(layer_decay)
        self.dcn_lr_mul = dcn_lr_mul
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            groups = layer_decay_param_groups(
                opt_model,
                self.args.learning_rate,
                self.args.weight_decay,
                layer_decay=self.layer_decay,
                dcn_lr_mul=self.dcn_lr_mul,
            )
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return super().create_optimizer(model)


# ---------------------------------------------------------------------------------------------- data plumbing
def image_classification_transform(
    image_processor, image_column: str = "image", label_column: str = "label"
) -> Callable[[dict], dict]:
    """A `datasets` `set_transform`/`with_transform` function: images -> `pixel_values`, labels -> `labels`."""

    def transform(batch: dict) -> dict:
        images = [image.convert("RGB") for image in batch[image_column]]
        out = {"pixel_values": image_processor(images, return_tensors="pt")["pixel_values"]}
        if label_column in batch:
            out["labels"] = torch.as_tensor(batch[label_column], dtype=torch.long)
        return out

    return transform


def collate_image_classification(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack transformed examples into a batch for `InternImageForImageClassification`."""
    batch = {"pixel_values": torch.stack([example["pixel_values"] for example in examples])}
    if "labels" in examples[0]:
        batch["labels"] = torch.stack([torch.as_tensor(example["labels"]) for example in examples])
    return batch


def compute_accuracy(eval_prediction) -> dict[str, float]:
    """`Trainer` `compute_metrics`: top-1 accuracy."""
    logits, labels = eval_prediction.predictions, eval_prediction.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


# ---------------------------------------------------------------------------------------------- models and data
def model_presets() -> list[str]:
    """Names `load_model_and_processor` builds from scratch: "tiny" (the demo's 0.4M-parameter model) + variants."""
    from .configuration_internimage import PRESETS

    return list(PRESETS)


def preset_config(name: str, **overrides):
    """Config of a preset, or None if `name` is not one (or is an existing path)."""
    from .configuration_internimage import PRESETS, InternImageConfig, variant_key

    if variant_key(name) not in PRESETS or Path(str(name)).exists():
        return None
    return InternImageConfig.from_preset(name, **overrides)


def load_model_and_processor(
    model_class,
    name_or_path: str,
    image_size: int | None = None,
    ignore_mismatched_sizes: bool = False,
    **config_overrides,
):
    """(model, image processor) for a preset name (random init) or a `save_pretrained` folder / Hub id.

    `config_overrides` (e.g. `num_labels`, `id2label`, `label2id`, `drop_path_rate`, `out_features`) go to the config.
    With a pretrained model, `ignore_mismatched_sizes=True` lets a head of another size be replaced (fine-tuning).
    The processor is the folder's own when it has one and `image_size` is not given, else the official eval
    transform at `image_size` (default: the config's `image_size`).
    """
    from .processing import make_image_processor

    processor = None
    config = preset_config(name_or_path, **config_overrides)
    if config is not None:
        model = model_class(config)
    else:
        model = model_class.from_pretrained(
            str(name_or_path), ignore_mismatched_sizes=ignore_mismatched_sizes, **config_overrides
        )
        if image_size is None:
            from transformers import AutoImageProcessor

            try:
                processor = AutoImageProcessor.from_pretrained(str(name_or_path))
            except (OSError, ValueError):
                processor = None
    if processor is None:
        processor = make_image_processor(image_size or model.config.image_size)
    return model, processor


def backbone_config_and_weights(name_or_path: str, out_features: Sequence[str]):
    """(InternImageConfig, trunk state dict or None) for a task head's `backbone_config`.

    A preset gives its config and no weights (random init); a `save_pretrained` folder or Hub id (a classifier
    folder works) gives its config and `InternImageBackbone` weights, to `load_state_dict` into the head's backbone
    after building the head from its config.
    """
    from .modeling_internimage import InternImageBackbone

    config = preset_config(name_or_path, out_features=list(out_features))
    if config is not None:
        return config, None
    backbone, _ = load_model_and_processor(InternImageBackbone, name_or_path, out_features=list(out_features))
    return backbone.config, backbone.state_dict()


SYNTHETIC_CLASSES = ("red", "green", "blue")


def make_synthetic_image_folder(
    root: str | Path,
    images_per_class: int = 16,
    size: int = 48,
    classes: Sequence[str] = SYNTHETIC_CLASSES[:2],
    seed: int = 0,
) -> Path:
    """Write `root/<class>/<i>.png`: random stripes whose dominant colour is the class, plus noise.

    The layout `datasets.load_dataset("imagefolder", data_dir=root)` reads. Easy to learn and to generalise from,
    so a few optimizer steps visibly lower the loss. Returns `root`.
    """
    from PIL import Image

    unknown = set(classes) - set(SYNTHETIC_CLASSES)
    if unknown:
        raise ValueError(f"unknown synthetic classes {sorted(unknown)}; choose from {SYNTHETIC_CLASSES}")
    rng = np.random.default_rng(seed)
    root = Path(root)
    yy, xx = np.mgrid[0:size, 0:size]
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        channel = SYNTHETIC_CLASSES.index(name)
        for i in range(images_per_class):
            angle, period = rng.uniform(0, np.pi), rng.uniform(6, 16)
            phase = (xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period + rng.uniform(0, 2 * np.pi)
            colours = rng.uniform(0, 110, size=(2, 3))
            colours[:, channel] += rng.uniform(120, 145, size=2)  # the class colour dominates both stripe colours
            image = np.where((np.sin(phase) > 0)[..., None], colours[0], colours[1])
            image = image + rng.normal(0, 12, size=(size, size, 3))
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / name / f"{i:04d}.png")
    return root


__all__ = [
    "InternImageTrainer",
    "backbone_config_and_weights",
    "collate_image_classification",
    "compute_accuracy",
    "image_classification_transform",
    "layer_decay_param_groups",
    "load_model_and_processor",
    "make_synthetic_image_folder",
    "model_presets",
    "no_weight_decay",
    "parameter_depth_ids",
    "preset_config",
]
