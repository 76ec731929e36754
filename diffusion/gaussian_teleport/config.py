"""Analytic early steps: the closed-form probability-flow ODE solution for Gaussian data.

Wang & Vastola (2023), "Diffusion Models Generate Images Like Painters": for data
``x0 ~ N(mu, U diag(lam) U^T)`` and the variance-exploding form ``y = x0 + sigma * eps``, the
probability-flow ODE ``dy/dsigma = (y - D(y, sigma)) / sigma`` with the exact denoiser
``D = mu + Sigma (Sigma + sigma^2 I)^-1 (y - mu)`` solves, along each eigenvector, to

    y_k(sigma) - mu_k = sqrt((lam_k + sigma^2) / (lam_k + sigma0^2)) * (y_k(sigma0) - mu_k).

The early, high-noise phase of real models follows this solution closely (outline first), so
the first 15-30 % of steps can be replaced by one closed-form jump from the initial noise to a
chosen noise level; the normal sampler then takes over. Mean and a PCA of the covariance are
estimated once from data (the zoo's training set or a folder of a user's samples) and cached.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..plan import SamplerConfig, SamplerPlan
from ..sampler import sampler_kind
from .hooks import teleport_step
from .state import GaussianStats

__all__ = ["GaussianTeleportConfig", "SAVED_STATS"]

logger = logging.getLogger(__name__)

SAVED_STATS = "mmskip_gaussian_stats"  # the stats file's name in a saved pipeline folder (plus its suffix)


@dataclass(frozen=True)
class GaussianTeleportConfig(SamplerConfig):
    """Replace the first ``skip_fraction`` of the steps by the closed-form Gaussian jump.

    Wang & Vastola (2023), "Diffusion Models Generate Images Like Painters: an Analytical Theory
    of Outline First, Details Later", https://arxiv.org/abs/2303.02490. A sampler-level
    technique: enable it with ``pipe.enable_skip(config)`` on an ``mmskip.pipelines`` pipeline.

    Args:
        stats_path: a ``.safetensors`` file written by :meth:`GaussianStats.save` (mean and PCA of
            the data in the sampler's x0 space, e.g. scaled latents). Required (default ``""`` is
            refused); it is read when the config is enabled. A pipeline's ``save_pretrained``
            copies it into the saved folder and stores it relative to the folder.
        skip_fraction: the fraction of the ``num_inference_steps`` grid replaced by the jump
            (default 0.2; must lie in [0, 1)). The sampler starts at grid step
            ``round(skip_fraction * num_inference_steps)``.
    """

    technique: ClassVar[str] = "gaussian_teleport"
    stats_path: str = ""
    skip_fraction: float = 0.2

    def __post_init__(self) -> None:
        if not 0.0 <= self.skip_fraction < 1.0:
            raise ValueError(f"skip_fraction must lie in [0, 1), got {self.skip_fraction}")
        if not self.stats_path:
            raise ValueError("stats_path= is required: build it with GaussianStats.fit(...).save(path)")

    @classmethod
    def search_space(cls, context: Any) -> Any:
        """Tunable on a pipeline's denoiser when the target knows the data's Gaussian statistics
        (``context.facts["gaussian_stats"]``, a stats file): the fraction of steps the jump replaces."""
        stats = context.facts.get("gaussian_stats") if context.kind == "denoiser" else None
        if not stats or not context.num_steps or context.num_steps < 3:
            return None
        from mmskip.tuning.space import FloatRange, Space

        def build(v: dict[str, Any]) -> GaussianTeleportConfig:
            n = int(v.get("num_inference_steps") or context.num_steps)
            plannable = context.facts.get("plannable_samplers")
            if plannable is not None and v.get("sampler") not in plannable:
                raise ValueError(f"the teleport cannot plan the {v.get('sampler')} sampler; it plans {plannable}")
            if round(v["skip_fraction"] * n) < 1:
                raise ValueError(f"skip_fraction={v['skip_fraction']:.3g} of {n} steps jumps over no step")
            return cls(stats_path=str(stats), skip_fraction=v["skip_fraction"])

        return Space(cls.technique, {"skip_fraction": FloatRange(0.05, 0.4)}, build, seeds=({"skip_fraction": 0.2},))

    def start(self, num_steps: int) -> int:
        """The first grid step the sampler runs."""
        return min(int(round(self.skip_fraction * num_steps)), num_steps - 1)

    def load_stats(self) -> GaussianStats:
        """The statistics in ``stats_path`` (read once per file version)."""
        p = Path(self.stats_path)
        if not p.is_file():
            raise FileNotFoundError(
                f"GaussianTeleportConfig: no stats file at {p}; build it with GaussianStats.fit(...).save(path)"
            )
        st = p.stat()
        return _load_cached(str(p.resolve()), st.st_mtime_ns, st.st_size)

    def validate(self, num_steps: int | None = None) -> None:
        self.load_stats()

    def saved_in(self, folder: Path) -> GaussianTeleportConfig:
        """Copy the stats file into a saved pipeline's ``folder`` (as ``mmskip_gaussian_stats``) and
        name it relative to the folder, so the folder loads from anywhere."""
        src = Path(self.stats_path)
        if not src.is_file():
            raise FileNotFoundError(
                f"GaussianTeleportConfig: no stats file at {src} to save with the pipeline; it was moved or deleted "
                "after enable_skip(). Put it back or enable a config with its new path"
            )
        dest = Path(folder) / f"{SAVED_STATS}{src.suffix}"
        if not (dest.exists() and os.path.samefile(src, dest)):
            shutil.copyfile(src, dest)
        return dataclasses.replace(self, stats_path=dest.name)

    def loaded_from(self, folder: Path) -> GaussianTeleportConfig:
        """A relative ``stats_path`` found in the saved pipeline's ``folder`` is read from there."""
        inside = Path(folder) / self.stats_path
        if Path(self.stats_path).is_absolute() or not inside.is_file():
            return self  # absolute, or saved before stats were copied (relative to the working directory)
        return dataclasses.replace(self, stats_path=str(inside.resolve()))

    def plan(self, scheduler: Any, plan: SamplerPlan) -> SamplerPlan:
        start = self.start(plan.num_steps)
        if start == 0:
            logger.warning(
                "GaussianTeleportConfig: skip_fraction=%s of %d steps rounds to 0 steps; sampling without the teleport",
                self.skip_fraction, plan.num_steps,
            )
            return plan
        if plan.first_step is not None:
            raise ValueError("GaussianTeleportConfig cannot follow another technique that sets the first step")
        sampler_kind(scheduler)  # refuses unsupported samplers before sampling
        if getattr(scheduler.config, "use_dynamic_shifting", False):
            raise ValueError(
                f"GaussianTeleportConfig: {type(scheduler).__name__} with use_dynamic_shifting=True (Flux, Qwen-Image) "
                "sets its noise grid from the image size inside the pipeline call, after the latents are drawn, so "
                "the closed-form jump cannot be planned; use StepSkipConfig or a scheduler with a fixed shift"
            )
        keep = tuple(sorted({start} | {k for k in plan.keep if k >= start}))
        return SamplerPlan(plan.num_steps, keep, teleport_step(self.load_stats(), start))


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int, size: int) -> GaussianStats:
    return GaussianStats.load(path)
