"""One removable binding of ``model.generate``, shared by the techniques that wrap it.

transformers binds a model's own ``custom_generate`` as an instance attribute
(``model.generate = partial(custom_generate, model=model)``); :class:`BindGenerate` does the same
while a technique is applied and puts back what was there on ``handle.remove()``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from diffusers.hooks import ModelHook


class BindGenerate(ModelHook):
    """While registered, ``module.generate`` is ``wrap(module, inner)``; ``inner`` is the
    ``generate`` the instance had (its own binding, else the class's), restored on removal."""

    def __init__(self, wrap: Callable[[torch.nn.Module, Callable], Callable]) -> None:
        super().__init__()
        self.wrap = wrap
        self._had_own = False
        self._own: Any = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._had_own = "generate" in module.__dict__
        self._own = module.__dict__.get("generate")
        inner = self._own if self._had_own else functools.partial(type(module).generate, module)
        module.generate = self.wrap(module, inner)
        return module

    def deinitalize_hook(self, module: torch.nn.Module) -> torch.nn.Module:  # (sic: diffusers' name)
        if self._had_own:
            module.generate = self._own
        else:
            module.__dict__.pop("generate", None)
        return module
