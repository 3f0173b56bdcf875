"""InternImage (DCNv3) as a native transformers model family.

`import internimage_hf` registers the model type "internimage" with AutoConfig, AutoModel,
AutoModelForImageClassification, AutoBackbone and AutoImageProcessor. Nothing is built or downloaded here.
"""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
)

from .configuration_internimage import VARIANTS, InternImageConfig
from .modeling_internimage import (
    InternImageBackbone,
    InternImageForImageClassification,
    InternImageModel,
    InternImagePreTrainedModel,
)
from .ops import dcnv3_core, dcnv3_core_reference
from .processing import make_image_processor

__version__ = "0.1.0"


def _register() -> None:
    AutoConfig.register(InternImageConfig.model_type, InternImageConfig, exist_ok=True)
    AutoModel.register(InternImageConfig, InternImageModel, exist_ok=True)
    AutoModelForImageClassification.register(InternImageConfig, InternImageForImageClassification, exist_ok=True)
    AutoBackbone.register(InternImageConfig, InternImageBackbone, exist_ok=True)
    processor_class = type(make_image_processor())
    try:
        AutoImageProcessor.register(InternImageConfig, image_processor_classes={"pil": processor_class},
                                    exist_ok=True)
    except TypeError:  # pragma: no cover - transformers before the backend split
        AutoImageProcessor.register(InternImageConfig, slow_image_processor_class=processor_class, exist_ok=True)


_register()

__all__ = [
    "VARIANTS",
    "InternImageBackbone",
    "InternImageConfig",
    "InternImageForImageClassification",
    "InternImageModel",
    "InternImagePreTrainedModel",
    "dcnv3_core",
    "dcnv3_core_reference",
    "make_image_processor",
]
