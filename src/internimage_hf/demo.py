"""`internimage-hf demo`: the end-to-end job, offline, on a data set scikit-learn ships.

Fine-tunes a small InternImage with `transformers.Trainer` on scikit-learn's handwritten digits (1797 8x8 images,
upsampled to 32x32 RGB, a stratified held-out split), evaluates it, saves model and image processor with
`save_pretrained`, reloads the folder through `pipeline("image-classification")`, classifies the held-out images and
writes a confusion-matrix PNG. Nothing is downloaded.

Needs the `train` extra's accelerate (for `Trainer`), scikit-learn and matplotlib; not `datasets`: the 1797 images
are held in memory as plain lists.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SIZE = 32
HELD_OUT_FRACTION = 0.2
SEED = 0
DEFAULT_EPOCHS = 12
QUICK_EPOCHS = 3
QUICK_TRAIN_IMAGES = 480
# The demo model's tensors are tiny (32x32 inputs, 16-128 channels): one thread runs it as fast as two on the 2-core
# reference machine, and unlike two it is not slowed down many times over when another job holds a core.
DEFAULT_THREADS = 1


@dataclass
class ImageSplit:
    """Images (PIL, RGB) with integer labels and the class names: one split of the digits."""

    images: list
    labels: list[int]
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices) -> ImageSplit:
        return ImageSplit([self.images[i] for i in indices], [self.labels[i] for i in indices], self.names)

    def encoded(self, image_processor) -> list[dict]:
        """Examples for `Trainer`: `pixel_values` (preprocessed once) and `labels`."""
        import torch

        pixels = image_processor(self.images, return_tensors="pt")["pixel_values"]
        return [{"pixel_values": p, "labels": torch.tensor(label)} for p, label in zip(pixels, self.labels)]


def load_digits_dataset(
    image_size: int = IMAGE_SIZE, held_out_fraction: float = HELD_OUT_FRACTION, seed: int = SEED
) -> dict[str, ImageSplit]:
    """scikit-learn's digits as {"train", "test"} `ImageSplit`s (stratified held-out split), PIL RGB images."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # 0..16 -> 0..255
    images = [
        Image.fromarray(p, mode="L").resize((image_size, image_size), Image.BICUBIC).convert("RGB") for p in pixels
    ]
    labels = [int(t) for t in digits.target]
    names = [str(i) for i in range(10)]
    train, test = train_test_split(
        list(range(len(labels))), test_size=held_out_fraction, random_state=seed, stratify=labels
    )
    every = ImageSplit(images, labels, names)
    return {"train": every.subset(train), "test": every.subset(test)}


def save_confusion_matrix(labels, predictions, names, path: Path, title: str) -> Path:
    """Confusion matrix PNG (matplotlib, Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    k = len(names)
    matrix = confusion_matrix(labels, predictions, labels=list(range(k)))
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.imshow(matrix, cmap="Blues")
    for i in range(k):
        for j in range(k):
            if matrix[i, j]:
                color = "white" if matrix[i, j] > matrix.max() / 2 else "black"
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color=color, fontsize=8)
    ax.set_xticks(range(k), names)
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_demo(args) -> int:
    """Train, evaluate, save, reload with a pipeline, classify.

    `args`: output_dir, epochs (None: the default budget), quick (tiny budget), threads (optional, default 1: torch
    intra-op threads while the demo runs; the previous setting is restored afterwards).
    """
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(getattr(args, "threads", None) or DEFAULT_THREADS)
    try:
        return _run_demo(args)
    finally:
        torch.set_num_threads(previous_threads)


def _run_demo(args) -> int:
    import torch
    from tqdm.auto import tqdm
    from transformers import TrainingArguments, pipeline, set_seed

    from .configuration_internimage import InternImageConfig
    from .modeling_internimage import InternImageForImageClassification
    from .processing import make_image_processor
    from .training import (
        InternImageTrainer,
        collate_image_classification,
        compute_accuracy,
    )

    start = time.perf_counter()
    quick = bool(getattr(args, "quick", False))
    epochs = args.epochs if getattr(args, "epochs", None) is not None else (QUICK_EPOCHS if quick else DEFAULT_EPOCHS)
    output_dir = Path(args.output_dir)
    model_dir = output_dir / "model"
    output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(SEED)

    splits = load_digits_dataset()
    if quick:
        order = torch.randperm(len(splits["train"]), generator=torch.Generator().manual_seed(SEED))
        splits["train"] = splits["train"].subset(order[:QUICK_TRAIN_IMAGES].tolist())
    names = splits["train"].names
    print(
        f"digits: {len(splits['train'])} training and {len(splits['test'])} held-out images, "
        f"{IMAGE_SIZE}x{IMAGE_SIZE} RGB, classes {' '.join(names)}"
    )

    processor = make_image_processor(IMAGE_SIZE)
    train_set = splits["train"].encoded(processor)
    test_set = splits["test"].encoded(processor)

    config = InternImageConfig.from_preset(
        "tiny",
        image_size=IMAGE_SIZE,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
    )
    model = InternImageForImageClassification(config)
    print(f"model: InternImage ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters), {epochs:g} epochs")

    training_args = TrainingArguments(
        output_dir=str(output_dir / "trainer"),
        num_train_epochs=epochs,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=128,
        learning_rate=2e-3,
        weight_decay=0.05,
        warmup_steps=0.1,
        lr_scheduler_type="cosine",
        eval_strategy="no" if quick else "epoch",
        logging_strategy="epoch",
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        seed=SEED,
        disable_tqdm=False,
    )
    trainer = InternImageTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=test_set,
        data_collator=collate_image_classification,
        compute_metrics=compute_accuracy,
        processing_class=processor,
    )
    trainer.train()
    metrics = trainer.evaluate()
    print(
        f"Trainer evaluation on the held-out split: accuracy {metrics['eval_accuracy']:.4f}, "
        f"loss {metrics['eval_loss']:.4f}"
    )

    trainer.save_model(str(model_dir))  # model + image processor (processing_class)
    print(f"saved model and image processor to {model_dir}")

    classifier = pipeline("image-classification", model=str(model_dir), device=0 if torch.cuda.is_available() else -1)
    images, labels = splits["test"].images, splits["test"].labels
    predictions = []
    batch = 120
    for i in tqdm(range(0, len(images), batch), desc="pipeline on held-out images"):
        for result in classifier(images[i : i + batch], top_k=1, batch_size=batch):
            predictions.append(int(config.label2id[result[0]["label"]]))
    accuracy = sum(int(p == t) for p, t in zip(predictions, labels)) / len(labels)
    for i in range(5):
        print(f"  held-out image {i}: true {names[labels[i]]}, predicted {names[predictions[i]]}")

    figure = save_confusion_matrix(
        labels,
        predictions,
        names,
        output_dir / "confusion_matrix.png",
        f"InternImage on digits (held-out accuracy {accuracy:.3f})",
    )
    elapsed = time.perf_counter() - start
    results = {
        "held_out_accuracy": accuracy,
        "trainer_eval_accuracy": metrics["eval_accuracy"],
        "epochs": epochs,
        "train_images": len(splits["train"]),
        "held_out_images": len(labels),
        "seconds": round(elapsed, 1),
        "quick": quick,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    (output_dir / "demo_results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"confusion matrix: {figure}")
    print(f"finished in {elapsed:.0f} s")
    print(f"held-out accuracy: {accuracy:.4f}")
    return 0


__all__ = ["ImageSplit", "load_digits_dataset", "run_demo", "save_confusion_matrix"]
