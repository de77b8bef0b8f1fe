"""Shipped small models and the model store (see :mod:`toolkit.models.store`)."""

from toolkit._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    submodules=["lm", "store", "tokenizer"],
    submod_attrs={
        "store": ["list_models", "locate", "model_entry"],
    },
)
