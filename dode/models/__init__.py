"""Layer 4, models: the registry (``registry``: ``load_model`` by name), the embedded testbeds (``testbeds``: the
exact Gaussian-mixture model; ``networks``: the small UNet), diffusers pipelines (``pipelines``) and the shipped
weights (``weights/``). See docs/design.md."""
from .registry import MODELS, ModelEntry, ModelNotFoundError, available_models, get_model, is_available, load_model

__all__ = ["MODELS", "ModelEntry", "ModelNotFoundError", "available_models", "get_model", "is_available", "load_model"]
