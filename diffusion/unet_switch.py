"""Multi-UNet switching (A-SDM): the full denoiser on some steps, a lighter one on the others.

A-SDM validates "the multi-UNet switching method for improving network speed"
(https://arxiv.org/abs/2406.00210): early steps decide the layout, late steps the detail, and
they need not run the same network. :class:`UNetSwitchConfig` is a sampler-level technique:
for each pipeline call it routes every denoiser call of the chosen grid steps to the light
UNet (e.g. one built by :mod:`mmskip.diffusion.assembly`), through a hook on the pipeline's
own denoiser that is removed when the call ends: :meth:`UNetSwitchConfig.route` gives the
pipeline a :class:`UNetSwitchRoute` (the handle: ``attach`` / ``remove`` / ``stats``) holding
the call's :class:`UNetSwitchState`. It composes with feature inheritance: the
route sits inside inheritance's hooks, so inheritance still sees every step; on light steps
the full UNet's blocks do not run, and inheritance reuses the features of its last full step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers.hooks import ModelHook
from torch import nn

from mmskip.inject import TechniqueState, attach_hook
from mmskip.registry import get_adapter

from .plan import SamplerConfig, SamplerPlan, SamplerRoute
from .tracker import StepTracker, bound_thread, serves

__all__ = ["UNetSwitchConfig", "UNetSwitchRoute", "UNetSwitchState"]

logger = logging.getLogger(__name__)

_HOOK = "mmskip_route_unet_switch"  # not the technique prefix: it sits under a model-level technique
_LOADED: dict[tuple[str, str, str], nn.Module] = {}


@dataclass(frozen=True)
class UNetSwitchConfig(SamplerConfig):
    """Run the light UNet ``light`` on part of the steps and the pipeline's own UNet on the rest.

    Multi-UNet switching from A-SDM (Zhu et al., 2024), https://arxiv.org/abs/2406.00210.
    Enable it with ``pipe.enable_skip(config)`` on an ``mmskip.pipelines`` pipeline (alone, or
    with a ``FeatureInheritanceConfig`` or step skipping).

    Args:
        light: a folder holding the light UNet (``save_assembled`` / ``save_pretrained``, or a
            pipeline folder with ``unet/``) or a zoo model name (e.g. ``"digits-sd-assembled"``).
            It must take the same inputs as the pipeline's UNet (an assembled UNet does).
        full_fraction: the fraction of the grid's steps that run the full UNet (default 0.5;
            rounded to whole steps).
        full_first: ``True`` (default): the full UNet runs the first (noisiest) steps, which set
            the layout, and the light one the rest; ``False``: the reverse.
    """

    technique: ClassVar[str] = "unet_switch"
    light: str = ""
    full_fraction: float = 0.5
    full_first: bool = True

    def __post_init__(self) -> None:
        if not self.light:
            raise ValueError("give light= : a folder with the light UNet or a zoo model name")
        if not 0.0 <= self.full_fraction <= 1.0:
            raise ValueError(f"full_fraction must lie in [0, 1], got {self.full_fraction}")

    def validate(self, num_steps: int | None = None) -> None:
        self.folder()

    def folder(self) -> Path:
        """Where the light UNet is (a ``FileNotFoundError`` says what to do if nowhere)."""
        p = Path(self.light)
        if p.is_dir():
            return p
        from mmskip import zoo

        if self.light in zoo.NAMES:
            return zoo.path(self.light)
        raise FileNotFoundError(
            f"light={self.light!r} is neither a folder nor a zoo model; build one with "
            "mmskip.diffusion.assembly (python -m mmskip.diffusion.assembly) and pass its folder"
        )

    def full_steps(self, num_steps: int) -> set[int]:
        """The grid steps (of ``num_steps``) that run the full UNet."""
        k = round(self.full_fraction * num_steps)
        return set(range(k)) if self.full_first else set(range(num_steps - k, num_steps))

    def route(self, plan: SamplerPlan) -> UNetSwitchRoute:
        """The switch for one call that runs ``plan`` (attached by the pipeline); which steps run
        is unchanged (:meth:`plan` keeps the default), only which network runs them."""
        return UNetSwitchRoute(self, plan)


class UNetSwitchState(TechniqueState):
    """What one call's switch remembers: the grid step of each denoiser call (``tracker``) and
    the grid steps each network ran (``steps_full``, ``steps_light``)."""

    def __init__(self, full: set[int]) -> None:
        self.full = full
        self.tracker = StepTracker()
        self.steps_full: list[int] = []
        self.steps_light: list[int] = []

    def reset(self) -> None:
        self.tracker.reset()

    def stats(self) -> dict[str, Any]:
        return {"full_unet_steps": list(self.steps_full), "light_unet_steps": list(self.steps_light)}


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

    def remove(self) -> None:
        if self._detach is not None:
            self._detach()
            self._detach = None

    def stats(self) -> dict[str, Any]:
        return self.state.stats()


def _load(folder: Path, like: nn.Module) -> nn.Module:
    """The light UNet in ``folder`` on ``like``'s device and dtype (loaded once per process)."""
    from .assembly.io import load_assembled

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
