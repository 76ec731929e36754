"""Analysis tools: where a model's depth goes and what can be skipped."""

from .voids import VoidReport, void_layers

__all__ = ["VoidReport", "void_layers"]
