"""RelaCtrl control skipping's hooks: a skipped control block passes its input on, its projection
adds a zero residual; :func:`attach` puts them on the positions a :class:`ControlSkipConfig` names."""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers.hooks import ModelHook
from torch import nn

from mmskip.inject import SkipHandle

from ..adapters import ResidualIO
from .config import ControlSkipConfig
from .positions import block_io, control_positions
from .state import ControlSkipState

__all__ = ["attach"]

logger = logging.getLogger(__name__)


class _PassThrough(ModelHook):
    """The control block returns its input: the chain goes on as if the block were absent."""

    def __init__(self, io: ResidualIO, handle: SkipHandle, name: str) -> None:
        super().__init__()
        self.io, self.counts, self.name = io, handle.counts, name

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        self.counts.record(self.name, 1.0, 1.0)
        return self.io.build(self.io.inputs(args, kwargs), args, kwargs)


class _Zero(ModelHook):
    """The projection contributes a zero residual (not computed)."""

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        x = args[0] if args else next(iter(kwargs.values()))
        out = module.out_features if isinstance(module, nn.Linear) else x.shape[-1]
        return torch.zeros(*x.shape[:-1], out, dtype=x.dtype, device=x.device)


def attach(config: ControlSkipConfig, controlnet: nn.Module, handle: SkipHandle) -> ControlSkipState:
    """Skip ``config.positions`` of ``controlnet``: hooks registered with ``handle``, whose state
    is the new :class:`ControlSkipState`. Unknown names are refused before anything is attached."""
    by_name = {p.name: p for p in control_positions(controlnet)}
    unknown = [n for n in config.positions if n not in by_name]
    if unknown:
        raise ValueError(f"unknown control positions {unknown}; this ControlNet has {list(by_name)}")
    state = ControlSkipState(config.positions)
    for name in config.positions:
        pos = by_name[name]
        handle.add_hook(pos.block, _PassThrough(block_io(pos.block), handle, name))
        handle.add_hook(pos.projection, _Zero())
    handle.state = state
    return state
