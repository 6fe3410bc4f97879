"""Hybrid model family for comparing fast-weight architectures; registered with the Auto
classes under ``model_type = "fastweights_hybrid"``."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from fastweights.models.hybrid.cache import HybridCache
from fastweights.models.hybrid.configuration import MIXERS, MLPS, HybridConfig
from fastweights.models.hybrid.modeling import HybridForCausalLM, HybridModel, HybridPreTrainedModel

__all__ = ["MIXERS", "MLPS", "HybridCache", "HybridConfig", "HybridForCausalLM", "HybridModel",
           "HybridPreTrainedModel"]

AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)
AutoModel.register(HybridConfig, HybridModel, exist_ok=True)
AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)
