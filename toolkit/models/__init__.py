"""Shipped small models and their registry (see :mod:`toolkit.models.registry`)."""

from toolkit.models.registry import get_model_entry, list_models, register_model

__all__ = ["get_model_entry", "list_models", "register_model"]
