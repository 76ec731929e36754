"""The seam into ``generate``: transformers' ``custom_generate``, bound as the model's own.

``model.generate(..., custom_generate=swift_decode)`` runs transformers' ``generate`` with the
SWIFT loop as its decoding method. While SWIFT is applied, :func:`route_generate` binds
``model.generate`` to do that by itself, the way transformers binds a model's own custom
generate (``model.generate = partial(custom_generate, model=model)`` in ``from_pretrained``), and
``handle.remove()`` unbinds it. A call the loop cannot serve (see :mod:`.fallback`) runs as the
model's plain ``generate`` instead, with a warning once per reason.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from transformers import GenerationConfig

from .._bind_generate import BindGenerate
from ..inject import _HANDLE_ATTR, SkipHandle
from .fallback import Fallback, call_reason
from .state import SwiftState

__all__ = ["swift_decode", "route_generate"]


def swift_decode(model: torch.nn.Module, input_ids: torch.Tensor, logits_processor: Any = None,
                 stopping_criteria: Any = None, generation_config: GenerationConfig | None = None,
                 streamer: Any = None, **model_kwargs: Any) -> Any:
    """``model.generate(..., custom_generate=swift_decode)``: the SWIFT loop of the config applied
    to ``model`` (what the routed ``model.generate`` passes itself)."""
    handle = model.__dict__.get(_HANDLE_ATTR)
    if handle is None or not isinstance(handle.state, SwiftState):
        raise ValueError("custom_generate=swift_decode needs mmskip.apply(model, SelfSpeculativeConfig()) first")
    return handle.state.decode(model, input_ids, logits_processor, stopping_criteria, generation_config,
                               streamer, **model_kwargs)


def _routed_generate(*args: Any, model: torch.nn.Module, **kwargs: Any) -> Any:
    """``model.generate`` while SWIFT is applied: transformers' own ``generate`` with
    ``custom_generate=swift_decode`` (a ``custom_generate`` the caller passes wins). A call SWIFT
    cannot serve runs as the model's plain ``generate``, with a warning once per reason."""
    if kwargs.get("custom_generate") is not None:
        return type(model).generate(model, *args, **kwargs)
    state = model.__dict__[_HANDLE_ATTR].state
    reason = call_reason(model, kwargs)
    if reason is None:
        swift = dict(kwargs)
        # generate() gives a custom_generate no streamer: bind it (the loop puts the prompt itself)
        swift["custom_generate"] = functools.partial(swift_decode, streamer=swift.pop("streamer", None))
        try:
            return type(model).generate(model, *args, **swift)
        except Fallback as err:  # raised before any forward; keep no traceback (it holds the prepared cache)
            reason = Fallback(err.key, err.why)
    state.fell_back(reason)
    return type(model).generate(model, *args, **kwargs)


def route_generate(model: torch.nn.Module, handle: SkipHandle) -> None:
    """Make ``model.generate(...)`` run SWIFT (through ``custom_generate``) until ``handle.remove()``."""
    handle.add_hook(model, BindGenerate(lambda module, inner: functools.partial(_routed_generate, model=module)),
                    ".generate")
