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
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .plan import SamplerConfig, SamplerPlan
from .sampler import sampler_kind, sigma_ve

__all__ = ["GaussianStats", "GaussianTeleportConfig", "teleport", "teleport_step"]

logger = logging.getLogger(__name__)

_FORMAT = "mmskip.gaussian_stats/1"
SAVED_STATS = "mmskip_gaussian_stats"  # the stats file's name in a saved pipeline folder (plus its suffix)


@dataclass
class GaussianStats:
    """Mean, top principal directions, their variances and the mean variance of the rest.

    Shapes: ``mean`` (D,), ``components`` (D, r) orthonormal columns, ``variances`` (r,),
    ``residual`` a float (variance per remaining direction); ``shape`` the per-sample shape.
    """

    mean: torch.Tensor
    components: torch.Tensor
    variances: torch.Tensor
    residual: float
    shape: tuple[int, ...]

    @classmethod
    def fit(cls, samples: torch.Tensor, rank: int | None = None) -> GaussianStats:
        """Estimate from ``samples`` (N, *shape) in the sampler's x0 space (e.g. scaled latents)."""
        if samples.ndim < 2 or samples.shape[0] < 2:
            raise ValueError("fit() needs at least two samples of shape (N, ...)")
        x = samples.detach().reshape(samples.shape[0], -1).double()
        n, d = x.shape
        finite = torch.isfinite(x).all(1)
        if not bool(finite.all()):
            raise ValueError(
                f"GaussianStats.fit(): {int((~finite).sum())} of {n} samples hold NaN or inf values (e.g. sample "
                f"{int((~finite).nonzero()[0])}); drop them first (a float16 VAE can overflow: encode in float32)"
            )
        r = min(rank if rank is not None else d, n - 1, d)
        if r < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        mean = x.mean(0)
        xc = x - mean
        _, s, vh = torch.linalg.svd(xc, full_matrices=False)
        var = s**2 / (n - 1)
        total = float(xc.pow(2).sum() / (n - 1))
        kept = float(var[:r].sum())
        residual = max(total - kept, 0.0) / max(d - r, 1) if d > r else 0.0
        return cls(mean.float(), vh[:r].T.contiguous().float(), var[:r].float(), residual, tuple(samples.shape[1:]))

    @classmethod
    def exact(cls, mean: torch.Tensor, cov: torch.Tensor, shape: tuple[int, ...] | None = None) -> GaussianStats:
        """From a known mean (D,) and covariance (D, D)."""
        lam, u = torch.linalg.eigh(cov.double())
        lam = lam.clamp_min(0)
        order = torch.argsort(lam, descending=True)
        return cls(mean.float(), u[:, order].float(), lam[order].float(), 0.0, shape or (mean.numel(),))

    @classmethod
    def from_images(
        cls, images: torch.Tensor, vae: nn.Module | None = None, rank: int | None = 256, batch_size: int = 64
    ) -> GaussianStats:
        """From images in [-1, 1] (N, C, H, W); with a ``vae`` the stats are of its scaled latents."""
        if vae is None:
            return cls.fit(images, rank)
        lat = []
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                x = images[i : i + batch_size].to(vae.device, vae.dtype)
                z = vae.encode(x).latent_dist.mean
                shift = getattr(vae.config, "shift_factor", None) or 0.0
                lat.append(((z - shift) * vae.config.scaling_factor).float().cpu())
        return cls.fit(torch.cat(lat), rank)

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        size: int,
        vae: nn.Module | None = None,
        rank: int | None = 256,
        channels: int | None = None,
    ) -> GaussianStats:
        """From every image file in ``folder``, resized to ``size`` x ``size``.

        Images are read with ``channels`` channels (1: grayscale, 3: RGB, 4: RGBA); default: the
        ``vae``'s ``in_channels``, else 3.
        """
        import numpy as np
        from PIL import Image

        if channels is None:
            channels = int(vae.config.in_channels) if vae is not None else 3
        modes = {1: "L", 3: "RGB", 4: "RGBA"}
        if channels not in modes:
            raise ValueError(f"from_folder(): channels must be 1, 3 or 4, got {channels}")
        files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        if len(files) < 2:
            raise ValueError(f"{folder} holds fewer than two images")
        arr = [np.asarray(Image.open(p).convert(modes[channels]).resize((size, size))) for p in files]
        x = torch.from_numpy(np.stack(arr)).float() / 127.5 - 1
        x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
        return cls.from_images(x, vae, rank)

    @classmethod
    def cached(cls, path: str | Path, build: Callable[[], GaussianStats]) -> GaussianStats:
        """Load ``path`` if it exists, else ``build()`` and save it there."""
        path = Path(path)
        if path.exists():
            return cls.load(path)
        stats = build()
        stats.save(path)
        return stats

    def save(self, path: str | Path) -> Path:
        """Write a ``.safetensors`` file: the tensors, plus ``residual`` and ``shape`` as JSON metadata."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"GaussianStats are saved as .safetensors files, got {path.name!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"mean": self.mean, "components": self.components, "variances": self.variances}
        meta = {"format": _FORMAT, "residual": float(self.residual), "shape": list(self.shape)}
        save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(path),
                  metadata={"mmskip": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> GaussianStats:
        """Read a file written by :meth:`save` (``.safetensors``; a legacy ``torch.save`` ``.pt`` file
        is read with ``weights_only=True`` and a warning)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no Gaussian stats at {path}; build them with GaussianStats.fit(...).save(path)")
        if path.suffix != ".safetensors":
            logger.warning("%s is a legacy torch.save file; re-save it with GaussianStats.load(p).save('x.safetensors')", path)
            d = torch.load(path, map_location="cpu", weights_only=True)
            return cls(d["mean"], d["components"], d["variances"], float(d["residual"]), tuple(d["shape"]))
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("mmskip")
            if raw is None:
                raise ValueError(f"{path} is not a GaussianStats file (no 'mmskip' metadata)")
            meta = json.loads(raw)
            t = {k: f.get_tensor(k) for k in ("mean", "components", "variances")}
        return cls(t["mean"], t["components"], t["variances"], float(meta["residual"]), tuple(meta["shape"]))


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
