"""Compatibility names only: the conversion tool lives in `internimage_hf.conversion`.

Import from there (`conversion.pipeline.convert`, `conversion.errors.ConversionError`, `conversion.keys`,
`conversion.source`, `conversion.output`); this module re-exports the names it used to define and holds no code.
"""

from .conversion.errors import ConversionError, PickleRefused
from .conversion.keys import convert_official_state_dict, rename_official_key
from .conversion.output import check_saved_weights, save_atomically, sweep_staging
from .conversion.pipeline import convert, load_converted_weights, model_from_official
from .conversion.source import (
    check_tensors,
    extract_state_dict,
    load_official_source,
    load_pth,
    load_weights_folder,
    read_official_config,
    weight_files,
)

__all__ = [
    "ConversionError",
    "PickleRefused",
    "check_saved_weights",
    "check_tensors",
    "convert",
    "convert_official_state_dict",
    "extract_state_dict",
    "load_converted_weights",
    "load_official_source",
    "load_pth",
    "load_weights_folder",
    "model_from_official",
    "read_official_config",
    "rename_official_key",
    "save_atomically",
    "sweep_staging",
    "weight_files",
]
