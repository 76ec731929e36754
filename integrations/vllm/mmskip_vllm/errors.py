"""The one error type a bad mmskip setting in vLLM raises, with a one-line message that says what
to change. Not a ``ValueError``: vLLM's configs are pydantic dataclasses, and pydantic would wrap
a ``ValueError`` raised while they validate into a multi-line ``ValidationError``."""

from __future__ import annotations

__all__ = ["DraftConfigError", "LayerSkipConfigError", "MmskipConfigError"]


class MmskipConfigError(Exception):
    """A bad mmskip setting in ``hf_overrides``; the message says what to change."""


class DraftConfigError(MmskipConfigError):
    """A bad ``mmskip_draft`` setting (self-speculative decoding)."""


class LayerSkipConfigError(MmskipConfigError):
    """A bad ``mmskip_layer_skip`` setting (``MmskipLlamaForCausalLM``)."""
