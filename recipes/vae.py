"""Recipe for ``digits-vae``: a tiny ``AutoencoderKL`` (1×32×32 -> 4×8×8 latents)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from mmskip.train import TrainTask, fit
from mmskip.zoo.card import write_card
from mmskip.zoo.data import augment, load_split

from ._fit import one_cycle

__all__ = ["make_vae", "train_vae", "fit_vae", "psnr_unit"]

STEPS = 900
BATCH = 32
KL_WEIGHT = 1e-3


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, sample_size=32,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=16)


class _Autoencode(TrainTask):
    """MSE + 0.1 L1 + ``kl_weight`` KL per latent element on batches ``draw()``."""

    def __init__(self, vae, draw: Callable[[], torch.Tensor], kl_weight: float, desc: str, g: torch.Generator) -> None:
        self.vae, self.draw, self.kl_weight, self.desc, self.g = vae, draw, kl_weight, desc, g

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.vae.named_parameters() if p.requires_grad}

    def prepare(self, accelerator) -> None:
        self.vae.to(accelerator.device).train()

    def batch(self, step: int) -> torch.Tensor:
        return self.draw()  # the recipes' one generator, in order (their runs are not resumed)

    def loss(self, xb: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        post = self.vae.encode(xb).latent_dist
        z = post.sample(generator=self.g)
        rec = self.vae.decode(z).sample
        kl = post.kl().mean() / z[0].numel()
        return {"mse": F.mse_loss(rec, xb), "l1": 0.1 * F.l1_loss(rec, xb), "kl": self.kl_weight * kl}


def fit_vae(vae, draw: Callable[[], torch.Tensor], steps: int, kl_weight: float, desc: str,
            g: torch.Generator) -> None:
    """Train ``vae`` on batches ``draw()`` of images in [-1, 1]: MSE + 0.1 L1 + ``kl_weight`` KL per
    latent element, AdamW lr 1e-3 (5 % warm-up, cosine to 0) with :func:`mmskip.train.fit`;
    posterior samples drawn from ``g``."""
    fit(_Autoencode(vae, draw, kl_weight, desc, g), one_cycle(steps, 1e-3, pct_start=0.05))


def psnr_unit(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1], measured on the [0, 1] range."""
    mse = F.mse_loss((a.clamp(-1, 1) + 1) / 2, (b.clamp(-1, 1) + 1) / 2).item()
    return 10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12))).item()


def train_vae(out: Path, steps: int = STEPS, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    t0 = time.time()
    x, _ = load_split("train")
    xt, _ = load_split("test")
    vae = make_vae()
    g = torch.Generator().manual_seed(seed)
    fit_vae(vae, lambda: augment(x[torch.randint(0, len(x), (BATCH,), generator=g)], g), steps, KL_WEIGHT, "digits-vae", g)
    vae.eval()
    with torch.no_grad():
        z_all = vae.encode(x).latent_dist.mode()
        scale = float(1.0 / z_all.std())
        vae.register_to_config(scaling_factor=scale)
        rec = vae.decode(vae.encode(xt).latent_dist.mode()).sample
        psnr = psnr_unit(rec, xt)
        vae16 = make_vae().eval()
        vae16.load_state_dict(vae.state_dict())
        vae16 = vae16.to(torch.float16)
        rec16 = vae16.float().decode(vae16.float().encode(xt).latent_dist.mode()).sample
    wall = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    vae.to(torch.float16).save_pretrained(out, safe_serialization=True)
    n = sum(p.numel() for p in vae.parameters())
    metrics = {"held-out reconstruction PSNR (dB, [0,1] range)": psnr,
               "held-out PSNR after fp16 round-trip of weights (dB)": psnr_unit(rec16, xt),
               "scaling_factor": scale, "parameters": n}
    write_card(out, "digits-vae",
               "Tiny `AutoencoderKL` shared by `digits-dit` and `digits-sd`: 1×32×32 digits in [-1, 1] -> 4×8×8 "
               "latents (multiply by `scaling_factor` for unit variance).",
               "scikit-learn `load_digits` upscaled to 32×32, fixed-seed split (`mmskip.zoo.data`), random "
               "rotation/scale/shift augmentation.",
               f"3 down/up blocks (16/32/64 channels, 1 resnet each), {n / 1e6:.2f}M params; loss MSE + 0.1·L1 + "
               f"{KL_WEIGHT}·KL per latent element; AdamW lr 1e-3 (5 % warm-up, cosine to 0; `mmskip.train.fit`), batch {BATCH}, {steps} steps. "
               "`scaling_factor` = 1/std of the train latents. Saved in fp16.",
               metrics, wall)
    return metrics
