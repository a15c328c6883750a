"""Applications built only on the public dnls ops."""

from .nlm import batch_for_memory, nlm

__all__ = ["batch_for_memory", "nlm"]
