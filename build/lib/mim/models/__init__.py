"""MAE models by registry: `create_model(name, **overrides)`."""

from mim.models.mae import MaskedAutoencoderViT
from mim.models.registry import create_model, list_models, model_args

__all__ = ["MaskedAutoencoderViT", "create_model", "list_models", "model_args"]
