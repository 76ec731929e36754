"""The seam into ``generate``: transformers' ``custom_generate``, bound as the model's own.

``model.generate(..., custom_generate=swift_decode)`` runs transformers' ``generate`` with the
SWIFT loop as its decoding method. While SWIFT is applied, :func:`route_generate` binds
``model.generate`` to do that by itself, the way transformers binds a model's own custom
generate (``model.generate = partial(custom_generate, model=model)`` in ``from_pretrained``), and
``handle.remove()`` unbinds it.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from diffusers.hooks import ModelHook
from transformers import GenerationConfig

from ..inject import _HANDLE_ATTR, SkipHandle
from .generate import SwiftState

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
    ``custom_generate=swift_decode`` (a ``custom_generate`` the caller passes wins)."""
    if kwargs.get("assistant_model") is not None:
        raise ValueError("SelfSpeculativeConfig drafts with the model itself; remove the handle to use assistant_model")
    if kwargs.get("custom_generate") is None:
        decode = swift_decode
        if kwargs.get("streamer") is not None:  # generate() gives a custom_generate no streamer of its own
            decode = functools.partial(swift_decode, streamer=kwargs["streamer"])
        kwargs["custom_generate"] = decode
    return type(model).generate(model, *args, **kwargs)


class _RouteGenerate(ModelHook):
    """Binds ``model.generate`` to :func:`_routed_generate` while applied (transformers binds a
    model's own ``custom_generate`` the same way) and restores it on removal."""

    def __init__(self) -> None:
        super().__init__()
        self._had_own = False
        self._own: Any = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._had_own = "generate" in module.__dict__
        self._own = module.__dict__.get("generate")
        module.generate = functools.partial(_routed_generate, model=module)
        return module

    def deinitalize_hook(self, module: torch.nn.Module) -> torch.nn.Module:  # (sic: diffusers' name)
        if self._had_own:
            module.generate = self._own
        else:
            module.__dict__.pop("generate", None)
        return module


def route_generate(model: torch.nn.Module, handle: SkipHandle) -> None:
    """Make ``model.generate(...)`` run SWIFT (through ``custom_generate``) until ``handle.remove()``."""
    handle.add_hook(model, _RouteGenerate(), ".generate")
