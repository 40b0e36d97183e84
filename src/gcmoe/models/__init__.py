"""Models: GC-MoE and the baselines, by name. Models take tensors and return tensors."""

from gcmoe.models.registry import create_model, get_model_entry, list_models, register_model

__all__ = ["create_model", "get_model_entry", "list_models", "register_model"]
