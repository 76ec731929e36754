"""Model assembly's bypass hook: a module returns its input stream (read and rebuilt with the same
:class:`~mmskip.diffusion.adapters.ResidualIO` that feature inheritance uses); :func:`attach` puts
it on the modules an :class:`AssemblyBypassConfig` names."""

from __future__ import annotations

import logging
from typing import Any

from diffusers.hooks import ModelHook
from torch import nn

from mmskip.inject import SkipHandle
from mmskip.registry import get_adapter

from ..adapters import ResidualIO
from .config import AssemblyBypassConfig
from .state import BypassState

__all__ = ["attach"]

logger = logging.getLogger(__name__)


class _Bypass(ModelHook):
    """Return the module's input stream as its output (the module contributes nothing)."""

    def __init__(self, module: nn.Module, io: ResidualIO | None) -> None:
        super().__init__()
        name = type(module).__name__
        self.io = io
        self.mid = name.startswith("UNetMidBlock")
        if self.io is None and not self.mid:
            raise TypeError(f"cannot bypass {name}: not a residual unit")

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.mid:  # a mid block maps hidden_states to the same shape; removing it passes them on
            return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return self.io.build(self.io.inputs(args, kwargs), args, kwargs)


def attach(config: AssemblyBypassConfig, unet: nn.Module, handle: SkipHandle) -> BypassState:
    """Bypass ``config.modules`` of ``unet``: hooks registered with ``handle``, whose state is the
    new :class:`BypassState`."""
    adapter = get_adapter(unet, "diffusion")
    state = BypassState(config.modules)
    for name in config.modules:
        mod = unet.get_submodule(name)
        handle.add_hook(mod, _Bypass(mod, adapter.io(mod)))
    handle.state = state
    return state
