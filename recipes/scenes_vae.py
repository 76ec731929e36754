"""Recipe for ``scenes-vae``: an ``AutoencoderKL`` for 3×32×32 scenes -> 4×16×16 latents (Flux-style
``shift_factor`` and ``scaling_factor``)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from mmskip.zoo.card import write_card
from mmskip.zoo.scenes_data import make_split, scenes_tensor

from .vae import fit_vae, psnr_unit

__all__ = ["make_scenes_vae", "train_scenes_vae"]

STEPS = 700
BATCH = 32
KL_WEIGHT = 1e-4
N_TRAIN = 12000


def make_scenes_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16)


def train_scenes_vae(out: Path, steps: int = STEPS, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    t0 = time.time()
    x = scenes_tensor(make_split("train", N_TRAIN)[0])
    xt = scenes_tensor(make_split("test", 500)[0])
    vae = make_scenes_vae()
    g = torch.Generator().manual_seed(seed)
    fit_vae(vae, lambda: x[torch.randint(0, len(x), (BATCH,), generator=g)], steps, KL_WEIGHT, "scenes-vae", g)
    vae.eval()
    with torch.no_grad():
        z_all = torch.cat([vae.encode(x[i:i + 500]).latent_dist.mode() for i in range(0, min(4000, len(x)), 500)])
        shift, scale = float(z_all.mean()), float(1.0 / z_all.std())
        vae.register_to_config(shift_factor=shift, scaling_factor=scale)
        rec = vae.decode(vae.encode(xt).latent_dist.mode()).sample
        psnr = psnr_unit(rec, xt)
    wall = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    vae.to(torch.float16).save_pretrained(out, safe_serialization=True)
    n = sum(p.numel() for p in vae.parameters())
    metrics = {"held-out reconstruction PSNR (dB, [0,1] range)": psnr, "shift_factor": shift,
               "scaling_factor": scale, "parameters": n}
    write_card(out, "scenes-vae",
               "`AutoencoderKL` of `scenes-flux`: 3×32×32 scenes in [-1, 1] -> 4×16×16 latents "
               "(`(z - shift_factor) * scaling_factor` has zero mean, unit variance).",
               f"{N_TRAIN} procedural scenes (`mmskip.zoo.scenes_data`, train seed), rebuilt on every run.",
               f"2 down/up blocks (32/64 channels, 1 resnet each), {n / 1e6:.2f}M params; loss MSE + 0.1·L1 + "
               f"{KL_WEIGHT}·KL per latent element; AdamW lr 1e-3 (5 % warm-up, cosine to 0; `mmskip.train.fit`), batch {BATCH}, {steps} steps. "
               "Saved in fp16.", metrics, wall)
    return metrics
