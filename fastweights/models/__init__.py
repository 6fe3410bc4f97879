"""Model glue and Hugging Face integration."""

from fastweights.models.inplace_ttt import (
    SUPPORTED_FAMILIES,
    convert,
    default_layers,
    is_converted,
    load_pretrained,
    register_family,
    ttt_modules,
    ttt_parameters,
)

__all__ = [
    "SUPPORTED_FAMILIES",
    "convert",
    "default_layers",
    "is_converted",
    "load_pretrained",
    "register_family",
    "ttt_modules",
    "ttt_parameters",
]
