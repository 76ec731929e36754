"""One call of an enabled drop-in pipeline: its plan, its planned sampler, and the denoiser it holds.

:class:`SkipCall` is what the mixin's overrides (``scheduler``, ``prepare_latents``,
``get_timesteps``) consult while a call runs; :func:`plan_call` builds it from the enabled
configs (validated and planned before anything changes); :func:`strength_steps` maps an
img2img / inpainting ``strength`` onto the call's grid; :func:`hooking` holds the denoiser for
one call that attaches hooks to it.
"""

from __future__ import annotations

import inspect
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from mmskip.diffusion.plan import DenoiserConfig, SamplerConfig, SamplerPlan, SamplerRoute
from mmskip.diffusion.sampler import begin_at, plan_sampler

from mmskip.inject import ConcurrentUseError, SkipConfig, SkipHandle

__all__ = ["SkipCall", "plan_call", "strength_steps", "hooking"]

logger = logging.getLogger(__name__)


@dataclass
class SkipCall:
    """A running call: ``plan`` (the grid steps it visits; narrowed by ``strength``), ``planned``
    (the scheduler copy that visits them; ``None``: the pipeline's own scheduler runs unchanged),
    ``via_latents`` (the first-step map is applied to the latents ``prepare_latents`` returns) and
    ``handle`` (the model-level technique applied for this call)."""

    plan: SamplerPlan
    planned: Any = None
    via_latents: bool = False
    handle: SkipHandle | None = None
    routes: tuple[SamplerRoute, ...] = ()


def validate(configs: tuple[SkipConfig, ...], num_steps: int | None) -> None:
    """Run the declared ``validate`` of every diffusion config (model-level configs that are not
    :class:`~mmskip.diffusion.plan.DenoiserConfig` declare no checks)."""
    for c in configs:
        if isinstance(c, (SamplerConfig, DenoiserConfig)):
            c.validate(num_steps)


def plan_call(scheduler: Any, configs: tuple[SkipConfig, ...], samplers: tuple[SamplerConfig, ...], n: int,
              prepares_latents: bool) -> SkipCall:
    """Validate every config for an ``n``-step call and plan it (nothing is changed yet).

    ``prepares_latents``: the pipeline draws its initial latents in ``prepare_latents``, where the
    analytic first step is applied (flow-matching pipelines never call ``scale_model_input``);
    otherwise the planned sampler applies it at its first step.
    """
    validate(configs, n)
    plan = SamplerPlan.full(n)
    for c in samplers:
        plan = c.plan(scheduler, plan)
    if plan.is_full:
        return SkipCall(plan)
    via_latents = plan.first_step is not None and prepares_latents
    planned = plan_sampler(scheduler, n, plan.keep, None if via_latents else plan.first_step)
    if via_latents:  # the grid must be known before the latents are mapped
        try:
            planned.set_timesteps(n)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"analytic early steps need the sampler's grid before sampling; {type(scheduler).__name__}"
                f" could not build it without pipeline arguments ({err})"
            ) from err
    return SkipCall(plan, planned, via_latents)


def strength_steps(call: SkipCall, original: Callable[..., Any], scheduler: Any, args: tuple, kwargs: dict) -> Any:
    """The pipeline's ``get_timesteps(n, strength, ...)`` (``original``) on the call's grid: learn
    which grid steps a ``strength`` < 1 call runs (``t_start..n-1``), map the plan onto them and
    tell the model-level technique, so every schedule keeps indexing the full ``n``-step grid.
    ``scheduler`` is the one the call runs (the planned copy, if any)."""
    plan, planned = call.plan, call.planned
    n = plan.num_steps
    # Flux img2img passes the length of the (planned) grid it got back; the rule needs n
    bound = inspect.signature(original).bind(*args, **kwargs)
    bound.arguments["num_inference_steps"] = n
    args, kwargs = bound.args, bound.kwargs
    if planned is not None:  # let the pipeline's own rule slice the full grid
        kept, scheduler.timesteps = scheduler.timesteps, scheduler.full_timesteps
    try:
        timesteps, _ = original(*args, **kwargs)
    finally:
        if planned is not None:
            scheduler.timesteps = kept
    order = scheduler.order
    t_start = n - len(timesteps) // order
    if t_start >= n:  # diffusers' img2img/inpainting refuse (or fail on) this too
        strength = bound.arguments.get("strength")
        raise ValueError(
            f"strength={strength} runs none of the {n} denoising steps (the pipeline runs "
            f"int(num_inference_steps * strength) of them); pass strength >= 1/num_inference_steps "
            f"({1 / n:.3g} here) or more num_inference_steps"
        )
    if t_start == 0:
        return original(*args, **kwargs) if planned is not None else (timesteps, n)
    if plan.first_step is not None:
        raise ValueError(
            f"strength < 1 starts from the noised input image at grid step {t_start}; the analytic "
            "early-step jump (GaussianTeleportConfig) starts from pure noise. Pass strength=1 or drop it"
        )
    visited = tuple(k for k in plan.keep if k >= t_start)
    if not visited:
        raise ValueError(
            f"this call runs grid steps {t_start}..{n - 1} (strength), where the step-skip plan visits "
            f"none of {list(plan.keep)}; use a schedule that keeps some of the last steps"
        )
    if planned is not None:
        pos = (len(plan.keep) - len(visited)) * order
        timesteps = planned.timesteps[pos:]
        begin_at(planned, pos)
    if call.handle is not None:
        call.handle.state.begin_call(n, visited)
    for route in call.routes:
        route.begin_call(n, visited)
    call.plan = SamplerPlan(n, visited, plan.first_step)
    logger.debug("strength: grid steps %d..%d run; visiting %s", t_start, n - 1, list(visited))
    return timesteps, len(visited)


_HOOKED: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()  # denoiser -> thread hooking it
_HOOKED_LOCK = threading.Lock()


@contextmanager
def hooking(denoiser: Any) -> Iterator[None]:
    """Hold ``denoiser`` for one Skip call that attaches hooks to it (``None``: none attached).

    A Skip call of another thread that would hook the same denoiser meanwhile is refused with
    :class:`ConcurrentUseError` before anything changes; plain calls from other threads are not
    held here: they pass through this call's hooks (see :mod:`mmskip.diffusion.tracker`).
    """
    if denoiser is None:
        yield
        return
    if isinstance(denoiser, torch._dynamo.eval_frame.OptimizedModule):
        denoiser = denoiser._orig_mod  # the module the hooks go on
    me = threading.get_ident()
    with _HOOKED_LOCK:
        holder = _HOOKED.get(denoiser)
        if holder is not None and holder != me:
            raise ConcurrentUseError(
                f"another pipeline call (thread {holder}) is running this {type(denoiser).__name__} with mmskip "
                "techniques attached; two pipelines sharing a denoiser cannot skip at the same time. Serialize the "
                "calls (e.g. a lock around them) or give each pipeline its own denoiser copy."
            )
        _HOOKED[denoiser] = me
    try:
        yield
    finally:
        if holder is None:
            with _HOOKED_LOCK:
                _HOOKED.pop(denoiser, None)
