"""Which parts of a UNet matter: the output change when an edit's units are bypassed.

Model assembly (A-SDM, https://arxiv.org/abs/2406.00210) removes the parts of the UNet that
change its prediction least. Here an edit's importance is measured, not chosen by hand: every
module the edit removes is bypassed (a residual unit returns its input, read and rebuilt
with the same :class:`~mmskip.diffusion.adapters.ResidualIO` that feature inheritance
uses), and an output of the teacher is compared with the unmodified one:
``importance = ||y_bypassed - y||^2 / ||y||^2``, where ``y`` is the noise prediction on
calibration inputs or, better for generation, the final latents of a short sampling run. The
bypass is a technique (:class:`~.config.AssemblyBypassConfig`, applied with ``mmskip.apply``,
removed exactly); :func:`bypassed` applies it for a ``with`` block, so the UNet is left
exactly as it was.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmskip.inject import SkipHandle, apply

from .config import AssemblyBypassConfig
from .plan import Edit, candidate_edits, flops_per_call

__all__ = ["CalibrationBatch", "bypassed", "edit_importance", "sampled_latents", "edit_savings", "choose_edits"]

logger = logging.getLogger(__name__)

# the UNets inside bypassed() blocks: the modules of each enclosing block, and the handle applied now
_OPEN: weakref.WeakKeyDictionary[nn.Module, tuple[list[tuple[str, ...]], list[SkipHandle]]] = weakref.WeakKeyDictionary()


@dataclass
class CalibrationBatch:
    """UNet inputs to measure on: noisy latents, their timesteps, text embeddings."""

    sample: torch.Tensor
    timestep: torch.Tensor
    context: torch.Tensor


@contextmanager
def bypassed(unet: nn.Module, edit: Edit) -> Iterator[nn.Module]:
    """``unet`` with the modules of ``edit`` bypassed (as if removed) inside the block: an
    :class:`~.config.AssemblyBypassConfig` applied for the block. Blocks nested on one UNet bypass
    the union of their edits (the enclosing block's config is re-applied with this edit's modules
    added, and restored when this block ends)."""
    blocks, current = _OPEN.setdefault(unet, ([], []))

    def reapply() -> None:
        while current:
            current.pop().remove()
        if blocks:
            modules = tuple(dict.fromkeys(m for b in blocks for m in b))
            current.append(apply(unet, AssemblyBypassConfig(modules=modules)))

    blocks.append(tuple(edit.modules))
    try:
        reapply()
        yield unet
    finally:
        blocks.pop()
        reapply()
        if not blocks:
            _OPEN.pop(unet, None)


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
