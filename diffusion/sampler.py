"""Run a diffusers scheduler on a subset of its own N-step grid, optionally starting mid-way.

Used by step skipping (visit only the kept steps: the sampler takes the larger step between
them) and by the analytic Gaussian teleport (start at step ``k`` from a closed-form state).
The pipeline's scheduler is never modified: :func:`plan_sampler` returns a configured copy.

Supported samplers: DDIM (``DDIMScheduler``), Euler (``EulerDiscreteScheduler``,
``FlowMatchEulerDiscreteScheduler``) and DPM-Solver++ / DPM-Solver (``DPMSolverMultistepScheduler``).
Euler and DPM-Solver step between consecutive entries of their ``sigmas`` array, so a subset of
the array is exactly that sampler on a coarser grid. DDIM's ``step`` assumes a uniform gap of
``T // N``; a DDIM grid with skipped steps runs on first-order DPM-Solver++, which is DDIM
(Lu et al., 2022, "DPM-Solver++", Sec. 4) on the kept DDIM timesteps, including DDIM's final
step to ``final_alpha_cumprod``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["SUPPORTED_SAMPLERS", "begin_at", "plan_sampler", "sampler_kind", "sigma_ve"]

logger = logging.getLogger(__name__)

SUPPORTED_SAMPLERS = {
    "DDIMScheduler": "vp",
    "EulerDiscreteScheduler": "ve",
    "DPMSolverMultistepScheduler": "vp",
    "FlowMatchEulerDiscreteScheduler": "flow",
}


def sampler_kind(scheduler: Any) -> str:
    """``vp`` (x = a x0 + s eps), ``ve`` (x = x0 + sigma eps) or ``flow`` (x = (1-s) x0 + s eps)."""
    name = type(scheduler).__name__
    if name not in SUPPORTED_SAMPLERS:
        raise ValueError(
            f"step skipping / analytic early steps support the DDIM, Euler and DPM-Solver++ samplers "
            f"({', '.join(SUPPORTED_SAMPLERS)}); got {name}. Swap the scheduler, e.g. "
            "pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)"
        )
    if name == "DPMSolverMultistepScheduler" and scheduler.config.algorithm_type not in ("dpmsolver++", "dpmsolver"):
        raise ValueError(f"DPMSolverMultistepScheduler with algorithm_type={scheduler.config.algorithm_type!r} is not supported")
    return SUPPORTED_SAMPLERS[name]


def sigma_ve(scheduler: Any, index: int, timesteps: torch.Tensor, sigmas: torch.Tensor | None) -> float:
    """The variance-exploding noise level sigma (x/scale = x0 + sigma eps) at grid ``index``."""
    kind = sampler_kind(scheduler)
    if kind == "flow":
        s = float(sigmas[index])
        return float("inf") if s >= 1 - 1e-7 else s / (1 - s)
    if sigmas is not None and type(scheduler).__name__ != "DDIMScheduler":
        return float(sigmas[index])
    a = float(scheduler.alphas_cumprod[int(timesteps[index])])
    return ((1 - a) / a) ** 0.5


def _ddim_final_sigma(ddim: Any) -> float:
    a = float(ddim.final_alpha_cumprod)
    return ((1 - a) / a) ** 0.5


def plan_sampler(
    scheduler: Any,
    num_inference_steps: int,
    keep: Sequence[int],
    first_step: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
) -> Any:
    """A copy of ``scheduler`` that visits only grid steps ``keep`` (sorted) of its N-step grid.

    ``first_step(sample, copy)``, if given, maps the sample the pipeline holds before the first
    visited step to the state the sampler should be in there (the Gaussian teleport); the copy
    applies it once, in ``scale_model_input`` and ``step``.
    """
    sampler_kind(scheduler)  # refuses unsupported samplers
    n = num_inference_steps
    keep = sorted(int(k) for k in keep)
    if not keep or keep[0] < 0 or keep[-1] >= n or len(set(keep)) != len(keep):
        raise ValueError(f"kept steps must be distinct indices in 0..{n - 1}, got {keep}")
    name = type(scheduler).__name__
    contiguous = keep == list(range(keep[0], n))
    if name == "DDIMScheduler" and not contiguous:
        logger.debug("DDIM on %d of %d grid steps runs as first-order DPM-Solver++ (the same method)", len(keep), n)
        return _ddim_as_dpm(scheduler, n, keep, first_step)
    copy = type(scheduler).from_config(scheduler.config)
    original = copy.set_timesteps

    def set_timesteps(num_inference_steps: int | None = None, device: Any = None, **kwargs: Any) -> None:
        # flow-matching pipelines (Flux, Qwen-Image) pass their own default sigma grid of n
        # entries; users' custom grids were refused by the pipeline before planning
        if kwargs.get("timesteps") is not None:
            raise ValueError("custom timesteps cannot be combined with step skipping or teleport")
        sigmas = kwargs.get("sigmas")
        asked = num_inference_steps if sigmas is None else len(sigmas)
        if asked != n:
            raise ValueError(f"this sampler was planned for {n} steps, the pipeline asked for {asked}")
        original(num_inference_steps, device=device, **kwargs)
        idx = torch.tensor(keep, device=copy.timesteps.device)
        copy.full_timesteps = copy.timesteps.clone()
        copy.timesteps = copy.timesteps[idx]
        sig = getattr(copy, "sigmas", None)
        if name != "DDIMScheduler" and sig is not None:
            copy.full_sigmas = sig.clone()
            copy.sigmas = torch.cat([sig[idx.to(sig.device)], sig[-1:]])
        if hasattr(copy, "_step_index"):
            copy._step_index = None
            copy._begin_index = None
        _arm(copy, first_step)

    # the original's signature: pipelines check it for ``sigmas`` / ``mu`` (diffusers' retrieve_timesteps)
    copy.set_timesteps = functools.wraps(original)(set_timesteps)
    copy.planned_keep = tuple(keep)
    return copy


def begin_at(planned: Any, index: int) -> None:
    """Start a sampler planned by :func:`plan_sampler` at its ``index``-th timestep (img2img
    ``strength``), as diffusers' image-to-image pipelines do with ``set_begin_index``. DDIM keeps
    no step index (its ``step`` reads the timestep it is given), so nothing is set there."""
    if type(planned).__name__ != "DDIMScheduler":
        planned.set_begin_index(index)


def _ddim_as_dpm(ddim: Any, n: int, keep: list[int], first_step: Any) -> Any:
    from diffusers import DPMSolverMultistepScheduler

    cfg = dict(ddim.config)
    dpm = DPMSolverMultistepScheduler.from_config(
        cfg,
        algorithm_type="dpmsolver++",
        solver_order=1,
        lower_order_final=True,
        use_karras_sigmas=False,
        final_sigmas_type="zero",
        thresholding=False,
    )
    if cfg.get("thresholding"):
        raise ValueError("DDIM with thresholding cannot skip steps")
    grid = type(ddim).from_config(cfg)
    original = dpm.set_timesteps

    def set_timesteps(num_inference_steps: int | None = None, device: Any = None, **kwargs: Any) -> None:
        if num_inference_steps != n:
            raise ValueError(f"this sampler was planned for {n} steps, the pipeline asked for {num_inference_steps}")
        grid.set_timesteps(n, device=device)
        original(len(keep), device=device)
        ts = grid.timesteps[torch.tensor(keep)]
        ac = dpm.alphas_cumprod.to(torch.float64)
        sig = [((1 - ac[int(t)]) / ac[int(t)]).sqrt().item() for t in ts]
        dpm.full_timesteps = grid.timesteps.clone()
        dpm.timesteps = ts.to(device) if device is not None else ts
        dpm.sigmas = torch.tensor(sig + [_ddim_final_sigma(grid)], dtype=torch.float32)
        dpm.num_inference_steps = len(keep)
        dpm._step_index = None
        dpm._begin_index = None
        _arm(dpm, first_step)

    dpm.set_timesteps = set_timesteps
    dpm.planned_keep = tuple(keep)
    return dpm


def _arm(copy: Any, first_step: Callable | None) -> None:
    """Wrap ``scale_model_input`` / ``step`` so ``first_step`` maps the state once, before step 1."""
    for attr in ("scale_model_input", "step"):
        copy.__dict__.pop(attr, None)
    if first_step is None:
        return
    cls = type(copy)
    memo: dict[str, Any] = {"done": False, "out": None}

    def teleport(sample: torch.Tensor) -> torch.Tensor:
        return first_step(sample, copy)

    def scale_model_input(sample: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not memo["done"]:
            sample = teleport(sample)
            out = cls.scale_model_input(copy, sample, *args, **kwargs)
            memo["out"] = out
            memo["first_in"] = sample
            return out
        return cls.scale_model_input(copy, sample, *args, **kwargs)

    def step(model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not memo["done"]:
            memo["done"] = True
            if sample is not memo["out"] and sample is not memo.get("first_in"):
                sample = teleport(sample)  # the pipeline kept its own (un-teleported) latents
            memo["out"] = memo["first_in"] = None
        return cls.step(copy, model_output, timestep, sample, *args, **kwargs)

    copy.scale_model_input = scale_model_input
    copy.step = step
