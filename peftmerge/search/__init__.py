"""Coefficient search: tune a merge method's lambda, density and per-model weights on validation data."""

from .search import search  # noqa: F401
