"""Model cards for converted checkpoints: Hub metadata, what the model is, how to use it, how it was made.

The YAML header comes from `huggingface_hub.ModelCardData`, so `ModelCard.load` parses what we write. Everything the
card states about the conversion (source hashes, strict loading, the forward check) is what the pipeline did;
official figures are quoted only for an identified official release.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PAPER_URL = "https://arxiv.org/abs/2211.05778"
CODE_URL = "https://github.com/OpenGVLab/InternImage"
PACKAGE = "internimage-hf"
SAMPLE_IMAGE = "http://images.cocodataset.org/val2017/000000039769.jpg"
CITATION = """@inproceedings{wang2023internimage,
  title={InternImage: Exploring Large-Scale Vision Foundation Models with Deformable Convolutions},
  author={Wang, Wenhai and Dai, Jifeng and Chen, Zhe and Huang, Zhenhang and Li, Zhiqi and Zhu, Xizhou and
          Hu, Xiaowei and Lu, Tong and Lu, Lewei and Li, Hongsheng and others},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2023}
}"""
FLASH_PAPER_URL = "https://arxiv.org/abs/2401.06197"
FLASH_CODE_URL = "https://github.com/OpenGVLab/DCNv4"
FLASH_CITATION = """@article{xiong2024efficient,
  title={Efficient Deformable ConvNets: Rethinking Dynamic and Sparse Operator for Vision Applications},
  author={Xiong, Yuwen and Li, Zhiqi and Chen, Yuntao and Wang, Feng and Zhu, Xizhou and Luo, Jiapeng and
          Wang, Wenhai and Lu, Tong and Li, Hongsheng and Qiao, Yu and Lu, Lewei and Zhou, Jie and Dai, Jifeng},
  journal={arXiv preprint arXiv:2401.06197},
  year={2024}
}"""
_LABEL_TEXT = {
    "imagenet-1k": "the 1000 ImageNet-1k classes (names in `config.id2label`)",
    "imagenet-22k": "the 21841 ImageNet-22k classes (names in `config.id2label`)",
}


@dataclass
class CardFacts:
    """Everything a card says, gathered by the pipeline (no tensors: meta-device plans can be rendered too)."""

    model_id: str  # repo id (or local folder) the usage snippet loads
    title: str  # "InternImage-T" or "InternImage (custom configuration)"
    architecture: str  # one line: channels, depths, groups, ...
    num_labels: int
    labels: str  # "imagenet-1k" | "imagenet-22k" | "custom" | "generic"
    image_size: int
    num_parameters: int
    source_label: str
    source_files: list[tuple[str, str]] = field(default_factory=list)  # (file name, sha256)
    source_commit: str | None = None
    use_ema: bool = False
    release: object | None = None  # releases.Release
    base_model: str | None = None
    num_tensors: int = 0
    verification: str = ""  # one sentence on the forward check
    date: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    core_op: str = "DCNv3"  # "DCNv4": a FlashInternImage card (its paper, code, tags and citation)

    @property
    def flash(self) -> bool:
        return self.core_op == "DCNv4"


def _millions(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.2f}M"


def card_metadata(facts: CardFacts):
    from huggingface_hub import EvalResult, ModelCardData

    release = facts.release
    if facts.flash:
        tags = ["internimage", "flashinternimage", "dcnv4", "image-classification", "vision", "internimage-hf"]
    else:
        tags = ["internimage", "dcnv3", "image-classification", "vision", "internimage-hf"]
    datasets = None
    if release is not None:
        datasets = release.datasets
    elif facts.labels in ("imagenet-1k", "imagenet-22k"):
        datasets = ["imagenet-1k" if facts.labels == "imagenet-1k" else "imagenet-21k"]
    eval_results = None
    if release is not None and release.top1 is not None:
        eval_results = [
            EvalResult(
                task_type="image-classification",
                task_name="Image Classification",
                dataset_type="imagenet-1k",
                dataset_name="ImageNet-1k",
                dataset_split="validation",
                metric_type="accuracy",
                metric_value=release.top1,
                metric_name="Top-1 accuracy (%)",
                source_name=f"Official {'FlashInternImage' if facts.flash else 'InternImage'} results",
                source_url=FLASH_CODE_URL if facts.flash else CODE_URL,
            )
        ]
    extra = {"base_model_relation": "finetune"} if facts.base_model else {}
    return ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        license="mit",
        datasets=datasets,
        tags=tags,
        base_model=facts.base_model,
        model_name=facts.title if eval_results else None,
        eval_results=eval_results,
        **extra,
    )


def usage_snippet(model_id: str) -> str:
    return f"""```python
import torch
import internimage_hf  # registers InternImage with the transformers Auto classes
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline
from transformers.image_utils import load_image

classifier = pipeline("image-classification", model="{model_id}")
print(classifier("{SAMPLE_IMAGE}")[:3])

image = load_image("{SAMPLE_IMAGE}")
processor = AutoImageProcessor.from_pretrained("{model_id}")
model = AutoModelForImageClassification.from_pretrained("{model_id}").eval()
with torch.no_grad():
    logits = model(**processor(image, return_tensors="pt")).logits
print(model.config.id2label[logits.argmax(-1).item()])
```"""


def render_card(facts: CardFacts) -> str:
    release = facts.release
    size = facts.image_size
    head = _LABEL_TEXT.get(
        facts.labels,
        f"{facts.num_labels} classes"
        + (
            " (generic names `LABEL_i`; set `id2label` for your classes)"
            if facts.labels == "generic"
            else " (names in `config.id2label`)"
        ),
    )
    lines = [f"# {facts.title}" + (f" ({release.name})" if release else ""), ""]
    family = "FlashInternImage" if facts.flash else "InternImage"
    if release is not None:
        repo = release.source_repo
        lines += [
            f"The official **{facts.title}** image classifier from OpenGVLab (`{release.source_file}` in "
            f"[`{repo}`](https://huggingface.co/{repo})), converted to a native "
            f"🤗 transformers model: no `trust_remote_code`, class names included, safetensors weights.",
        ]
    else:
        lines += [
            f"A {family} image classifier converted from a {family} checkpoint to a native 🤗 transformers "
            "model. It is not identified as one of the official OpenGVLab releases, so no official figures are "
            "quoted.",
        ]
    if facts.flash:
        about = (
            f"FlashInternImage ([paper]({FLASH_PAPER_URL}); [code]({FLASH_CODE_URL})) is InternImage ([paper]"
            f"({PAPER_URL}), CVPR 2023) with its DCNv3 operator replaced by DCNv4: the same deformable convolution "
            "with learned sampling offsets, but without softmax normalisation of the sampling weights and with "
            "memory access reorganised for speed."
        )
    else:
        about = (
            f"InternImage ([paper]({PAPER_URL}), CVPR 2023; [code]({CODE_URL})) is a large-scale convolutional vision "
            "backbone built on DCNv3, a deformable convolution with shared weights across groups, softmax-normalised "
            "sampling weights and learned sampling offsets."
        )
    lines += [
        "",
        about,
        "",
        "## Model details",
        "",
        "| | |",
        "|---|---|",
        f"| Architecture | {facts.architecture} |",
        f"| Classification head | {head} |",
    ]
    if release is not None:
        lines.append(f"| Training data | {release.training} |")
    lines += [
        f"| Input | {size}x{size} RGB: resize the shorter side to {size} (bicubic), centre-crop {size}x{size}, "
        f"ImageNet mean/std (the official evaluation transform; `AutoImageProcessor` does it) |",
        f"| Parameters | {_millions(facts.num_parameters)} ({facts.num_parameters:,}, counted)"
        + (f"; officially reported: {release.params}" if release is not None and release.params else "")
        + " |",
    ]
    if release is not None and release.flops:
        lines.append(f"| FLOPs (official) | {release.flops} at {size}x{size} |")
    if release is not None and release.top1 is not None:
        lines.append(f"| ImageNet-1k top-1 (official) | {release.top1}% at {size}x{size} |")
    if facts.base_model:
        lines.append(f"| Fine-tuned from | [`{facts.base_model}`](https://huggingface.co/{facts.base_model}) |")
    lines += [
        "| License | MIT (as the official release) |",
        "",
        "## How to use",
        "",
        f"```bash\npip install {PACKAGE}\n```",
        "",
        usage_snippet(facts.model_id),
        "",
        "As a backbone for detection or segmentation (feature maps at strides 4, 8, 16 and 32):",
        "",
        f"""```python
from internimage_hf import InternImageBackbone

backbone = InternImageBackbone.from_pretrained(
    "{facts.model_id}", out_features=["stage1", "stage2", "stage3", "stage4"]
)
```""",
        "",
        "## Conversion and verification",
        "",
    ]
    citation = f"{FLASH_CITATION}\n\n{CITATION}" if facts.flash else CITATION  # FlashInternImage builds on InternImage
    files = ", ".join(f"`{name}` (sha256 `{digest}`)" for name, digest in facts.source_files) or "(unknown)"
    source = f"`{facts.source_label}`" + (f" at commit `{facts.source_commit}`" if facts.source_commit else "")
    lines += [
        f"- Source: {source}; weight files {files}"
        + ("; the `model_ema` weights were used." if facts.use_ema else "."),
        f"- Converted on {facts.date} with internimage_hf {facts.versions.get('internimage_hf', '?')} "
        f"(transformers {facts.versions.get('transformers', '?')}, torch {facts.versions.get('torch', '?')}) by "
        f"`internimage-hf convert`.",
        f"- Key mapping: the {facts.num_tensors} official tensors were renamed to this package's module names "
        "(Sequential indices become names, `gamma1/2` become `layer_scale1/2`); no tensor was changed. Loading "
        "was strict: no missing or unexpected key, every shape checked.",
        "- The saved safetensors were read back and compared bit for bit with the converted model.",
        f"- Forward check: {facts.verification}",
        "",
        "## Citation",
        "",
        f"```bibtex\n{citation}\n```",
        "",
    ]
    body = "\n".join(lines)
    return f"---\n{card_metadata(facts).to_yaml()}\n---\n\n{body}"
