"""InternImage (DCNv3) as a native transformers model family.

`import internimage_hf` registers the model type "internimage" with AutoConfig, AutoModel,
AutoModelForImageClassification, AutoBackbone and AutoImageProcessor. Nothing is built or downloaded here.

The one exception is the `internimage-hf` command itself (its console script, or `python -m internimage_hf`): there
the package is imported first, so that `--help` and argument errors answer without loading torch and transformers;
the command loads and registers everything (`_load()`) before it runs a subcommand, and so does the first access to
any public name.
"""

import itertools
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what `_load()` puts into the namespace
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

_loaded = False


def _register() -> None:
    from transformers import (
        AutoBackbone,
        AutoConfig,
        AutoImageProcessor,
        AutoModel,
        AutoModelForImageClassification,
    )
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping

    from .auto_backbone import load_local_folders_directly
    from .configuration_internimage import InternImageConfig
    from .conversion.keys import remote_code_renamings
    from .modeling_internimage import (
        InternImageBackbone,
        InternImageForImageClassification,
        InternImageModel,
    )
    from .processing import make_image_processor

    AutoConfig.register(InternImageConfig.model_type, InternImageConfig, exist_ok=True)
    AutoModel.register(InternImageConfig, InternImageModel, exist_ok=True)
    AutoModelForImageClassification.register(InternImageConfig, InternImageForImageClassification, exist_ok=True)
    AutoBackbone.register(InternImageConfig, InternImageBackbone, exist_ok=True)
    # OpenGVLab's remote-code repos (same model type, official weight names) load natively through these renamings
    register_checkpoint_conversion_mapping(InternImageConfig.model_type, remote_code_renamings(), overwrite=True)
    load_local_folders_directly(AutoBackbone)  # transformers asks the Hub about local folders too (offline: error)
    processor_class = type(make_image_processor())
    AutoImageProcessor.register(InternImageConfig, image_processor_classes={"pil": processor_class}, exist_ok=True)


def _load() -> None:
    """Import the public classes into the package namespace and register them with the Auto classes (once)."""
    global _loaded
    if _loaded:
        return
    from .configuration_internimage import VARIANTS, InternImageConfig
    from .modeling_internimage import (
        InternImageBackbone,
        InternImageForImageClassification,
        InternImageModel,
        InternImagePreTrainedModel,
    )
    from .ops import dcnv3_core, dcnv3_core_reference
    from .processing import make_image_processor

    globals().update(
        VARIANTS=VARIANTS,
        InternImageBackbone=InternImageBackbone,
        InternImageConfig=InternImageConfig,
        InternImageForImageClassification=InternImageForImageClassification,
        InternImageModel=InternImageModel,
        InternImagePreTrainedModel=InternImagePreTrainedModel,
        dcnv3_core=dcnv3_core,
        dcnv3_core_reference=dcnv3_core_reference,
        make_image_processor=make_image_processor,
    )
    _register()
    _loaded = True


def _launched_as_command() -> bool:
    """Whether this import is the `internimage-hf` command starting (console script or `python -m internimage_hf`).

    Both are exact: the console script is the `__main__` file named `internimage-hf`, and `-m internimage_hf` is in
    the interpreter's own command line. Any other program importing the package gets the eager import."""
    main = Path(getattr(sys.modules.get("__main__"), "__file__", None) or "")
    for name in (main.name, main.parent.name):  # bin/internimage-hf, or Windows' internimage-hf.exe/__main__.py
        if name.lower().removesuffix(".exe").removesuffix("-script.py") == "internimage-hf":
            return True
    argv = list(getattr(sys, "orig_argv", []))
    return any(a == "-m" and b in ("internimage_hf", "internimage_hf.cli") for a, b in itertools.pairwise(argv))


def __getattr__(name: str):
    if name in __all__ and not _loaded:
        _load()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if not _launched_as_command():
    _load()
