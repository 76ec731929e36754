"""Recipe for ``digits-vae``: a tiny ``AutoencoderKL`` (1×32×32 -> 4×8×8 latents)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mmskip.zoo.card import write_card
from mmskip.zoo.data import augment, load_split

__all__ = ["make_vae", "train_vae", "fit_vae", "psnr_unit"]

STEPS = 900
BATCH = 32
KL_WEIGHT = 1e-3


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, sample_size=32,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=16)


def fit_vae(vae, draw: Callable[[], torch.Tensor], steps: int, kl_weight: float, desc: str,
            g: torch.Generator) -> None:
    """Train ``vae`` on batches ``draw()`` of images in [-1, 1]: MSE + 0.1 L1 + ``kl_weight`` KL per
    latent element, AdamW one-cycle lr 1e-3; posterior samples drawn from ``g``."""
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    vae.train()
    for _ in (bar := tqdm(range(steps), desc=desc)):
        xb = draw()
        post = vae.encode(xb).latent_dist
        z = post.sample(generator=g)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / z[0].numel()
        loss = F.mse_loss(rec, xb) + 0.1 * F.l1_loss(rec, xb) + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", kl=f"{kl.item():.2f}")


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
               f"{KL_WEIGHT}·KL per latent element; AdamW one-cycle lr 1e-3, batch {BATCH}, {steps} steps. "
               "`scaling_factor` = 1/std of the train latents. Saved in fp16.",
               metrics, wall)
    return metrics
