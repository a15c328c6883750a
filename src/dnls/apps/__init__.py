"""Applications built only on the public dnls ops."""

from .nlm import nlm

__all__ = ["nlm"]
