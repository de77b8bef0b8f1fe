"""Shipped small models and the model store (see :mod:`toolkit.models.store`)."""

from toolkit.models.store import list_models, locate, model_entry

__all__ = ["list_models", "locate", "model_entry"]
