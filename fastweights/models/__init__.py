"""Model glue and Hugging Face integration."""

from fastweights.models.cache import InPlaceTTTCache
from fastweights.models.fwl import FWLCache, add_fwl, fwl_layer, has_fwl
from fastweights.models.inplace_ttt import (
    SUPPORTED_FAMILIES,
    convert,
    default_layers,
    is_converted,
    load_pretrained,
    register_family,
    set_max_update_norm,
    ttt_modules,
    ttt_parameters,
)

__all__ = [
    "FWLCache",
    "InPlaceTTTCache",
    "SUPPORTED_FAMILIES",
    "add_fwl",
    "convert",
    "fwl_layer",
    "has_fwl",
    "default_layers",
    "is_converted",
    "load_pretrained",
    "register_family",
    "set_max_update_norm",
    "ttt_modules",
    "ttt_parameters",
]
