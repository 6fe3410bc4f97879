"""Model glue and Hugging Face integration."""

from fastweights.models.cache import InPlaceTTTCache
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
    "InPlaceTTTCache",
    "SUPPORTED_FAMILIES",
    "convert",
    "default_layers",
    "is_converted",
    "load_pretrained",
    "register_family",
    "ttt_modules",
    "ttt_parameters",
]
