"""Transformer block I/O read from diffusers' own ``TransformerBlockRegistry``.

diffusers' caches (FirstBlockCache, MagCache, TaylorSeer) describe each registered block class
by where ``hidden_states`` / ``encoder_hidden_states`` sit in its arguments and its return
value. mmskip reads the same metadata, so every block family diffusers' caches support is a
residual unit here too, without a second hand-written table.

Two corrections to the metadata, both checked on diffusers 0.42.1: an argument name that is
not in the block's signature (``ZImageTransformerBlock`` takes ``x``, the metadata says
``hidden_states``) falls back to the block's first argument; and whether a block returns a
bare tensor or a tuple is learned from its first real output.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from functools import cache
from typing import Any

import torch

from .residual_io import ResidualIO, arg_getter

__all__ = ["registered_block_classes", "registry_io"]

logger = logging.getLogger(__name__)


def _registry() -> dict[type, Any]:
    from diffusers.hooks._helpers import TransformerBlockRegistry

    TransformerBlockRegistry._register()  # diffusers fills it lazily
    return TransformerBlockRegistry._registry


def registered_block_classes() -> list[type]:
    """Every block class in diffusers' ``TransformerBlockRegistry`` (24 in diffusers 0.42.1)."""
    return list(_registry())


@cache
def registry_io(cls: type) -> ResidualIO | None:
    """The residual IO of block class ``cls`` from diffusers' metadata, or None if unregistered.

    Streams are ``(hidden_states, encoder_hidden_states)``; the second is ``None`` for blocks
    that do not return the text stream (Wan, LTX, Z-Image, DiT, PixArt).
    """
    meta = _registry().get(cls)
    if meta is None:
        return None
    params = list(inspect.signature(cls.forward).parameters)[1:]
    h_name = meta.hidden_states_argument_name
    if h_name not in params:
        logger.debug("%s has no argument %r; its first argument %r is the hidden stream", cls.__name__, h_name, params[0])
        h_name = params[0]
    hidden = arg_getter(h_name, params.index(h_name))
    hi, ei = meta.return_hidden_states_index, meta.return_encoder_hidden_states_index
    enc: Callable[[tuple, dict], Any] | None = None
    if ei is not None:
        e_name = meta.encoder_hidden_states_argument_name
        if e_name not in params:
            raise ValueError(f"{cls.__name__} returns {e_name!r} but does not take it; cannot inherit its residual")
        enc = arg_getter(e_name, params.index(e_name))
    shape: dict[str, int | None] = {"tuple_len": None}  # learned from the first output (None: bare tensor)

    def inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, ...]:
        return (hidden(args, kwargs), enc(args, kwargs) if enc is not None else None)

    def outputs(out: Any) -> tuple[torch.Tensor | None, ...]:
        if isinstance(out, torch.Tensor):
            shape["tuple_len"] = None
            return (out, None)
        shape["tuple_len"] = len(out)
        return (out[hi], out[ei] if ei is not None else None)

    def build(tensors: tuple[torch.Tensor | None, ...], args: tuple, kwargs: dict) -> Any:
        n = shape["tuple_len"]
        if n is None and ei is not None:  # not seen yet: a block returning both streams returns a tuple
            n = max(hi, ei) + 1
        if n is None:
            return tensors[0]
        out: list[Any] = [None] * n
        out[hi] = tensors[0]
        if ei is not None:
            out[ei] = tensors[1]
        return tuple(out)

    return ResidualIO(inputs=inputs, outputs=outputs, build=build)
