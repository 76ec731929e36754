"""The Gaussian teleport's state: :class:`GaussianStats`, the mean and principal directions of the
data it jumps with, estimated once from data and saved as a ``.safetensors`` file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["GaussianStats"]

logger = logging.getLogger(__name__)

_FORMAT = "mmskip.gaussian_stats/1"


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
