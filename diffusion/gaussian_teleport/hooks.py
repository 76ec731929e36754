"""The Gaussian teleport's sampler hook: the closed-form jump (:func:`teleport`) and the first-step
map a planned sampler applies to the pipeline's initial noise (:func:`teleport_step`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from ..sampler import sampler_kind, sigma_ve
from .state import GaussianStats

__all__ = ["teleport", "teleport_step"]

logger = logging.getLogger(__name__)


def teleport(y0: torch.Tensor, stats: GaussianStats, sigma0: float, sigma: float) -> torch.Tensor:
    """Closed-form PF-ODE solution from noise level ``sigma0`` to ``sigma`` (VE form, per sample).

    ``y0`` is (B, *shape) with ``y = x0 + sigma0 * eps``. ``sigma0 = inf`` takes the limit: ``y0``
    is then the unit noise ``eps`` itself (flow matching starts at pure noise).
    """
    b = y0.shape[0]
    dt = y0.dtype
    y = y0.reshape(b, -1).double()
    if y.shape[1] != stats.mean.numel():
        raise ValueError(f"stats are for {tuple(stats.shape)} samples, got {tuple(y0.shape[1:])}")
    mu = stats.mean.to(y.device).double()
    u = stats.components.to(y.device).double()
    lam = stats.variances.to(y.device).double()
    rest = stats.residual
    d = y if math.isinf(sigma0) else y - mu
    coef = u.T @ d.T  # (r, B)
    outside = d - (u @ coef).T
    if math.isinf(sigma0):
        g, g_rest = (lam + sigma**2).sqrt(), math.sqrt(rest + sigma**2)
    else:
        g = ((lam + sigma**2) / (lam + sigma0**2)).sqrt()
        g_rest = math.sqrt((rest + sigma**2) / (rest + sigma0**2))
    out = mu + (u @ (g[:, None] * coef)).T + g_rest * outside
    return out.reshape(y0.shape).to(dt)


def teleport_step(stats: GaussianStats, start: int) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """The sampler hook mapping the pipeline's initial noise to the closed-form state at grid ``start``.

    The pipeline scaled its unit noise by the *planned* sampler's ``init_noise_sigma``; the full
    sampler would have started from that noise at grid step 0. The state is converted to the VE
    form, jumped with :func:`teleport`, and converted back for the sampler.
    """

    def first_step(sample: torch.Tensor, sched: Any) -> torch.Tensor:
        kind = sampler_kind(sched)
        full_t = getattr(sched, "full_timesteps", None)
        full_s = getattr(sched, "full_sigmas", None)
        if full_t is None:
            raise RuntimeError("teleport needs a sampler planned by mmskip.diffusion.sampler.plan_sampler")
        s0 = sigma_ve(sched, 0, full_t, full_s)
        sk = sigma_ve(sched, start, full_t, full_s)
        eps = sample / float(getattr(sched, "init_noise_sigma", 1.0))
        if kind == "ve":
            y0 = eps * math.sqrt(s0**2 + 1) if _sqrt_init(sched) else eps * s0
            return teleport(y0, stats, s0, sk)
        if kind == "flow":
            y0 = eps if math.isinf(s0) else eps / (1 - float(full_s[0]))
            yk = teleport(y0, stats, s0, sk)
            return yk * (1 - float(full_s[start]))
        # vp: x = sqrt(a) * y
        a0 = 1 / (1 + s0**2)
        ak = 1 / (1 + sk**2)
        return teleport(eps / math.sqrt(a0), stats, s0, sk) * math.sqrt(ak)

    return first_step


def _sqrt_init(sched: Any) -> bool:
    return sched.config.timestep_spacing not in ("linspace", "trailing")
