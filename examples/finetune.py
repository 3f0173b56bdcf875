"""Fine-tune InternImage for image classification with `transformers.Trainer`.

Data: an image folder (`root/<class name>/<image>`, read with `datasets`' "imagefolder"), a `datasets` data set
saved with `save_to_disk`, or a Hub data set name. Without `--data` a small synthetic image folder is written first,
so the script runs as written:

    python examples/finetune.py                                   # tiny model, synthetic stripes, 2 epochs
    python examples/finetune.py --data path/to/folder --model path/to/converted/internimage_t --layer-decay 0.9

`--model` is a `save_pretrained` folder (e.g. made by `internimage-hf convert`), a Hub id, or a preset trained from
scratch: "tiny" or an official variant name ("t", "s", "b", "l", "xl", "h", "g"). A pretrained head of another size
is replaced (`num_labels` + `ignore_mismatched_sizes`).

Several processes (CPU: gloo; GPUs: nccl), one checkpoint written by rank 0 into --output-dir:

    torchrun --nproc_per_node 2 examples/finetune.py --output-dir outputs/finetune
    accelerate launch --config_file examples/accelerate/ddp.yaml examples/finetune.py
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch
from transformers import TrainingArguments, set_seed

from internimage_hf import InternImageForImageClassification
from internimage_hf.training import (
    InternImageTrainer,
    collate_image_classification,
    compute_accuracy,
    image_classification_transform,
    load_model_and_processor,
    make_synthetic_image_folder,
    model_presets,
)

# transformers 5.23 renamed TrainingArguments.gradient_checkpointing (now a deprecated alias) to
# activation_checkpointing; use whichever this version has.
CHECKPOINTING_ARG = (
    "activation_checkpointing"
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    else "gradient_checkpointing"
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data",
        default=None,
        help="image folder, save_to_disk folder or Hub data set name "
        "(default: write a synthetic image folder into OUTPUT_DIR/data)",
    )
    p.add_argument(
        "--model",
        default="tiny",
        help=f"save_pretrained folder, Hub id, or preset: {', '.join(model_presets())} (default: tiny)",
    )
    p.add_argument("--output-dir", default="outputs/finetune")
    p.add_argument("--image-size", type=int, default=None, help="training resolution (default: the model's)")
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument(
        "--max-steps", type=int, default=-1, help="stop after this many optimizer steps (overrides --epochs)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=float, default=0.1, help="warm-up steps, or a fraction of all steps if < 1")
    p.add_argument("--layer-decay", type=float, default=1.0, help="layer-wise LR decay (official fine-tunes: 0.9)")
    p.add_argument("--dcn-lr-mul", type=float, default=None, help="extra LR factor for DCNv3 offsets (official: 0.1)")
    p.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate (official: T .1, S .4, ...)")
    p.add_argument(
        "--gradient-checkpointing",
        "--activation-checkpointing",
        action="store_true",
        help="recompute each block in backward (less memory, ~30%% more time)",
    )
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CPU or GPU)")
    p.add_argument("--torch-compile", action="store_true", help="torch.compile the model (inductor)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="held-out part when the data has no validation/test split (0: none)",
    )
    p.add_argument("--logging-steps", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def load_image_dataset(data: str, val_fraction: float, seed: int):
    """(train, eval or None, image column, label column) from a folder, a save_to_disk folder or a Hub name."""
    import datasets

    path = Path(data)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        loaded = datasets.load_from_disk(str(path))
    elif path.is_dir():
        loaded = datasets.load_dataset("imagefolder", data_dir=str(path))
    else:
        loaded = datasets.load_dataset(data)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    train = loaded["train"]
    image_column = next(n for n, f in train.features.items() if isinstance(f, datasets.Image))
    label_column = next(n for n, f in train.features.items() if isinstance(f, datasets.ClassLabel))
    evaluation = next((loaded[s] for s in ("validation", "val", "test") if s in loaded), None)
    if evaluation is None and val_fraction > 0:
        split = train.train_test_split(test_size=val_fraction, seed=seed, stratify_by_column=label_column)
        train, evaluation = split["train"], split["test"]
    return train, evaluation, image_column, label_column


def main(argv=None) -> int:
    args = parse_args(argv)
    fine_tune(args)
    end_distributed()
    return 0


def end_distributed() -> None:
    """Tear down the process group in an order torch cannot deadlock in.

    DDP's reducer holds the process group. Freed last, from the reducer (with the GIL held), gloo's destructor joins
    its worker threads while one of them may wait for the GIL to free a finished collective's tensors: the worker
    hangs (left to interpreter exit instead, it aborts). So the trainer and its DDP wrapper go first, and
    `destroy_process_group` then frees the group from Python, which releases the GIL while it waits.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gc.collect()  # the trainer, its accelerator and the DDP wrapper hold each other in cycles
        torch.distributed.destroy_process_group()


def fine_tune(args: argparse.Namespace) -> None:
    output_dir = Path(args.output_dir)
    cpu = not torch.cuda.is_available()
    training_args = TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup,
        lr_scheduler_type="cosine",
        logging_strategy="steps",
        logging_steps=args.logging_steps,
        eval_strategy="epoch",
        save_strategy="no",  # one checkpoint, written at the end by rank 0 (below)
        report_to="none",
        remove_unused_columns=False,
        bf16=args.bf16,
        torch_compile=args.torch_compile,
        **{CHECKPOINTING_ARG: args.gradient_checkpointing},
        ddp_find_unused_parameters=False,
        use_cpu=cpu,  # on a machine without GPUs this is what makes several processes use DDP over gloo
        dataloader_pin_memory=not cpu,
        seed=args.seed,
    )
    set_seed(args.seed)

    with training_args.main_process_first(desc="preparing the data set"):  # rank 0 writes/caches, others reuse
        data = args.data
        if data is None:
            data = output_dir / "data"
            if not data.exists():
                make_synthetic_image_folder(data, images_per_class=24)
        train, evaluation, image_column, label_column = load_image_dataset(str(data), args.val_fraction, args.seed)
    if evaluation is None:
        training_args.eval_strategy = "no"
    names = train.features[label_column].names
    id2label = dict(enumerate(names))

    overrides = dict(num_labels=len(names), id2label=id2label, label2id={n: i for i, n in id2label.items()})
    if args.drop_path is not None:
        overrides["drop_path_rate"] = args.drop_path
    model, processor = load_model_and_processor(
        InternImageForImageClassification,
        args.model,
        image_size=args.image_size,
        ignore_mismatched_sizes=True,
        **overrides,
    )
    transform = image_classification_transform(processor, image_column, label_column)
    trainer = InternImageTrainer(
        model=model,
        args=training_args,
        train_dataset=train.with_transform(transform),
        eval_dataset=evaluation.with_transform(transform) if evaluation is not None else None,
        data_collator=collate_image_classification,
        compute_metrics=compute_accuracy,
        processing_class=processor,
        layer_decay=args.layer_decay,
        dcn_lr_mul=args.dcn_lr_mul,
    )
    result = trainer.train()
    metrics = dict(result.metrics)
    if evaluation is not None:
        metrics.update(trainer.evaluate())
    trainer.save_model()  # model + image processor into OUTPUT_DIR; only the main process writes
    trainer.save_state()  # trainer_state.json with the loss history (main process)
    if trainer.is_world_process_zero():
        (output_dir / "finetune_results.json").write_text(
            json.dumps({"metrics": metrics, "world_size": training_args.world_size, "labels": names}, indent=2) + "\n"
        )
        print(
            f"saved the fine-tuned model to {output_dir} (world size {training_args.world_size}); "
            + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
        )


if __name__ == "__main__":
    raise SystemExit(main())
