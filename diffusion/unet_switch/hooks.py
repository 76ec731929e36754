"""Multi-UNet switching's hook on the pipeline's denoiser and the route that attaches it for one
call (:class:`UNetSwitchRoute`, the handle a drop-in pipeline attaches, removes and reads)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers.hooks import ModelHook
from torch import nn

from mmskip.inject import attach_hook
from mmskip.registry import get_adapter

from ..plan import SamplerPlan, SamplerRoute
from ..tracker import bound_thread, serves
from .state import UNetSwitchState

if TYPE_CHECKING:
    from .config import UNetSwitchConfig

__all__ = ["UNetSwitchRoute"]

logger = logging.getLogger(__name__)

_HOOK = "mmskip_route_unet_switch"  # not the technique prefix: it sits under a model-level technique
_LOADED: dict[tuple[str, str, str], nn.Module] = {}


class UNetSwitchRoute(SamplerRoute):
    """The switch of one pipeline call: a hook on the pipeline's denoiser (see :class:`SamplerRoute`)."""

    def __init__(self, config: UNetSwitchConfig, plan: SamplerPlan) -> None:
        self.config = config
        self.plan = plan
        self.state = UNetSwitchState(config.full_steps(plan.num_steps))
        self._detach: Any = None

    def attach(self, denoiser: nn.Module) -> None:
        light = _load(self.config.folder(), denoiser)
        hook = _SwitchHook(get_adapter(denoiser, "diffusion"), light, self.state)
        self.state.tracker.begin(self.plan.num_steps, self.plan.keep)
        self._detach = attach_hook(denoiser, hook, _HOOK)

    def begin_call(self, num_steps: int, visited: tuple[int, ...]) -> None:
        self.state.tracker.begin(num_steps, visited)  # grid steps, not the call's own step count

    def remove(self) -> None:
        if self._detach is not None:
            self._detach()
            self._detach = None

    def stats(self) -> dict[str, Any]:
        return self.state.stats()


def _load(folder: Path, like: nn.Module) -> nn.Module:
    """The light UNet in ``folder`` on ``like``'s device and dtype (loaded once per process)."""
    from ..assembly.io import load_assembled

    p = next(like.parameters())
    key = (str(folder.resolve()), str(p.device), str(p.dtype))
    if key not in _LOADED:
        _LOADED[key] = load_assembled(folder, dtype=p.dtype).to(p.device).requires_grad_(False)
        logger.info("loaded the light UNet from %s", folder)
    return _LOADED[key]


class _SwitchHook(ModelHook):
    """Routes the calls of light steps to the light UNet (the full one's forward is not run)."""

    def __init__(self, adapter: Any, light: nn.Module, state: UNetSwitchState) -> None:
        super().__init__()
        self.adapter, self.light, self.state = adapter, light, state
        self.thread = bound_thread()  # the pipeline call's: other threads' calls are not routed

    @torch.compiler.disable
    def _is_full(self, args: tuple, kwargs: dict) -> bool:
        ad, st = self.adapter, self.state
        st.tracker.observe(ad.timestep(args, kwargs), ad.call_key(args, kwargs))
        step = st.tracker.step
        full = step in st.full
        if st.tracker.first_call_of_step:
            (st.steps_full if full else st.steps_light).append(step)
        return full

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not serves(self.thread) or self._is_full(args, kwargs):
            return self.fn_ref.original_forward(*args, **kwargs)
        return self.light(*args, **kwargs)
