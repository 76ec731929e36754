"""``ResidualIO``: how a residual module's stream tensors are read from its call and written back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ResidualIO", "arg_getter"]


@dataclass
class ResidualIO:
    """How to read the residual-stream tensors a module takes and rebuild its output from them.

    ``inputs(args, kwargs)`` returns the stream tensors the module receives; ``outputs(out)`` the
    same tensors after it (same order, ``None`` where absent); ``build(tensors, args, kwargs)``
    wraps tensors into the module's output format.
    """

    inputs: Callable[[tuple, dict], tuple[torch.Tensor | None, ...]]
    outputs: Callable[[Any], tuple[torch.Tensor | None, ...]]
    build: Callable[[tuple[torch.Tensor | None, ...], tuple, dict], Any]


def arg_getter(name: str, index: int) -> Callable[[tuple, dict], Any]:
    """Read argument ``name`` (position ``index`` when passed positionally) from a call."""

    def get(args: tuple, kwargs: dict) -> Any:
        if name in kwargs:
            return kwargs[name]
        return args[index] if len(args) > index else None

    return get
