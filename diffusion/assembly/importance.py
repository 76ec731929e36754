"""Which parts of a UNet matter: the output change when an edit's units are bypassed.

Model assembly (A-SDM, https://arxiv.org/abs/2406.00210) removes the parts of the UNet that
change its prediction least. Here an edit's importance is measured, not chosen by hand: every
module the edit removes is bypassed (a residual unit returns its input, read and rebuilt
with the same :class:`~mmskip.diffusion.adapters.ResidualIO` that feature inheritance
uses), and an output of the teacher is compared with the unmodified one:
``importance = ||y_bypassed - y||^2 / ||y||^2``, where ``y`` is the noise prediction on
calibration inputs or, better for generation, the final latents of a short sampling run. The hooks are removed afterwards; the
UNet is left exactly as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import ModelHook
from torch import nn

from mmskip.inject import attach_hook
from mmskip.registry import get_adapter

from ..adapters import ResidualIO
from .plan import Edit, candidate_edits, flops_per_call

__all__ = ["CalibrationBatch", "bypassed", "edit_importance", "sampled_latents", "edit_savings", "choose_edits"]

logger = logging.getLogger(__name__)

_HOOK = "mmskip_assembly_bypass"


@dataclass
class CalibrationBatch:
    """UNet inputs to measure on: noisy latents, their timesteps, text embeddings."""

    sample: torch.Tensor
    timestep: torch.Tensor
    context: torch.Tensor


class _Bypass(ModelHook):
    """Return the module's input stream as its output (the module contributes nothing)."""

    def __init__(self, module: nn.Module, io: ResidualIO | None) -> None:
        super().__init__()
        name = type(module).__name__
        self.io = io
        self.mid = name.startswith("UNetMidBlock")
        if self.io is None and not self.mid:
            raise TypeError(f"cannot bypass {name}: not a residual unit")

    def new_forward(self, module: nn.Module, *args, **kwargs):
        if self.mid:  # a mid block maps hidden_states to the same shape; removing it passes them on
            return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return self.io.build(self.io.inputs(args, kwargs), args, kwargs)


@contextmanager
def bypassed(unet: nn.Module, edit: Edit) -> Iterator[nn.Module]:
    """``unet`` with the modules of ``edit`` bypassed (as if removed) inside the block."""
    adapter = get_adapter(unet, "diffusion")
    detach = []
    try:
        for name in edit.modules:
            mod = unet.get_submodule(name)
            detach.append(attach_hook(mod, _Bypass(mod, adapter.io(mod)), _HOOK))
        yield unet
    finally:
        for d in reversed(detach):
            d()


@torch.no_grad()
def edit_importance(unet: nn.Module, measure: list[CalibrationBatch] | Callable[[], torch.Tensor],
                    edits: list[Edit] | None = None) -> dict[str, float]:
    """Relative squared change ``||y_bypassed - y||^2 / ||y||^2`` of an output ``y`` when each edit is bypassed.

    ``measure`` is either calibration batches (``y`` = the UNet's prediction on each) or a
    callable returning ``y``, e.g. :func:`sampled_latents` (the final latents of a short sampling
    run: conditioning that is a small part of one step's noise prediction still decides the
    sample, so whole-trajectory change is the better importance for generation).
    """
    edits = candidate_edits(unet) if edits is None else edits
    if callable(measure):
        run = measure
    else:
        def run() -> torch.Tensor:
            return torch.cat([unet(b.sample, b.timestep, b.context).sample.flatten() for b in measure])
    ref = run()
    out = {}
    for edit in edits:
        with bypassed(unet, edit):
            y = run()
        out[edit.name] = ((y - ref).pow(2).sum() / ref.pow(2).sum()).item()
        logger.debug("importance of %s: %.4g", edit.name, out[edit.name])
    return out


def sampled_latents(pipe: Any, prompts: list[str], steps: int = 10, guidance_scale: float = 4.0,
                    seed: int = 0) -> Callable[[], torch.Tensor]:
    """A ``measure`` for :func:`edit_importance`: the final latents of ``pipe`` on ``prompts`` (fixed seed)."""

    def run() -> torch.Tensor:
        pipe.set_progress_bar_config(disable=True)
        g = torch.Generator().manual_seed(seed)
        return pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance_scale, generator=g,
                    output_type="latent").images.float()

    return run


def edit_savings(unet: nn.Module, batch: CalibrationBatch, edits: list[Edit] | None = None) -> dict[str, float]:
    """Fraction of one UNet call's FLOPs each edit removes."""
    edits = candidate_edits(unet) if edits is None else edits
    full = flops_per_call(unet, batch.sample, batch.timestep, batch.context)
    out = {}
    for edit in edits:
        with bypassed(unet, edit):
            out[edit.name] = 1 - flops_per_call(unet, batch.sample, batch.timestep, batch.context) / full
    return out


def choose_edits(importance: dict[str, float], savings: dict[str, float], speedup: float) -> list[str]:
    """The least important edits per FLOP saved, until the FLOPs speedup reaches ``speedup``.

    Greedy on importance / saving (cheapest quality loss per FLOP first); raises if even every
    edit together cannot reach ``speedup``.
    """
    if speedup <= 1:
        raise ValueError(f"speedup must be > 1 (a lighter UNet), got {speedup}")
    order = sorted(importance, key=lambda k: importance[k] / max(savings[k], 1e-9))
    chosen: list[str] = []
    saved = 0.0
    for name in order:
        if 1 / (1 - saved) >= speedup:
            break
        chosen.append(name)
        saved += savings[name]
    if 1 / (1 - saved) < speedup * (1 - 1e-6):
        raise ValueError(
            f"removing every candidate edit ({sorted(importance)}) saves {saved:.0%} of the FLOPs "
            f"({1 / (1 - saved):.2f}x); speedup {speedup} is out of reach for this UNet"
        )
    return chosen
