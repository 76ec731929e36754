"""Recipe for ``digits-dit``: a class-conditional latent ``DiTTransformer2DModel`` for ``DiTPipeline``."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mmskip.train import fit
from mmskip.zoo.card import write_card
from mmskip.zoo.data import DIGIT_NAMES, encode_augmented, load_split

from ._fit import RecipeTask, ema_copies, one_cycle

__all__ = ["make_dit", "make_scheduler", "train_dit", "ID2LABEL"]

STEPS = 3500
BATCH = 96
LR = 1e-3
EMA = 0.999
COPIES = 8
NULL_CLASS = 1000  # DiTPipeline's unconditional label
ID2LABEL = {i: f"{i}, {n}" for i, n in enumerate(DIGIT_NAMES)}


def make_dit():
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=4,
                                 num_layers=6, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
                                 norm_type="ada_norm_zero", dropout=0.0)


def make_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                         clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")


class _Denoise(RecipeTask):
    """eps-prediction on noised latents, class label dropped to the null label 10 % of the time."""

    def __init__(self, model, lat: torch.Tensor, lab: torch.Tensor, seed: int) -> None:
        from diffusers import DDPMScheduler

        super().__init__({"transformer": model}, seed, "digits-dit")
        self.model, self.lat, self.lab = model, lat, lab
        self.noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                                         beta_end=0.02)

    def draw(self, g: torch.Generator) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, len(self.lab), (BATCH,), generator=g)
        z0, c = self.lat[idx], self.lab[idx].clone()
        c[torch.rand(BATCH, generator=g) < 0.1] = NULL_CLASS
        t = torch.randint(0, 1000, (BATCH,), generator=g)
        return {"z0": z0, "c": c, "t": t, "noise": torch.randn(z0.shape, generator=g)}

    def loss(self, b: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        pred = self.model(self.noise_sched.add_noise(b["z0"], b["noise"], b["t"]), timestep=b["t"],
                          class_labels=b["c"]).sample
        return {"mse": F.mse_loss(pred, b["noise"])}


def train_dit(out: Path, steps: int = STEPS, seed: int = 0) -> dict:
    from diffusers import AutoencoderKL

    from mmskip.zoo import path

    torch.manual_seed(seed)
    t0 = time.time()
    vae = AutoencoderKL.from_pretrained(path("digits-vae"), dtype=torch.float32).eval()
    x, y = load_split("train")
    g = torch.Generator().manual_seed(seed)
    lat = encode_augmented(vae, x, COPIES, g)
    lab = y.repeat(COPIES)
    model = make_dit()
    task = _Denoise(model, lat, lab, seed)
    result = fit(task, one_cycle(steps, LR, pct_start=0.03, max_grad_norm=1.0, ema=EMA, ema_warmup=True,
                                 batch_size=BATCH, seed=seed))
    ema = ema_copies(task.modules, result.ema)["transformer"]
    wall = time.time() - t0
    save_pipeline_folder(out, ema, path("digits-vae"))
    (out / "train_info.json").write_text(json.dumps({"wall_time_s": wall, "steps": steps}) + "\n")
    return finish_card(out, wall, steps)


def save_pipeline_folder(out: Path, transformer, vae_dir: Path) -> None:
    """Write a ``DiTPipeline`` folder: transformer (fp16), the zoo VAE, a DDIM scheduler, id2label."""
    out.mkdir(parents=True, exist_ok=True)
    transformer.to(torch.float16).save_pretrained(out / "transformer", safe_serialization=True)
    shutil.copytree(vae_dir, out / "vae", dirs_exist_ok=True)
    for extra in ("README.md", "metrics.json"):
        (out / "vae" / extra).unlink(missing_ok=True)
    make_scheduler().save_pretrained(out / "scheduler")
    (out / "id2label.json").write_text(json.dumps({str(k): v for k, v in ID2LABEL.items()}, indent=1) + "\n")
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "DiTPipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "DDIMScheduler"], "transformer": ["diffusers", "DiTTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"]}, indent=2) + "\n")


def finish_card(out: Path, wall: float, steps: int, n: int = 300) -> dict:
    """Measure the saved pipeline (accuracy, FID vs held-out digits) and write its model card."""
    from mmskip.eval.images import evaluate_class_pipeline
    from mmskip.zoo.loaders import LOADERS

    pipe = LOADERS["digits-dit"](out)
    m50 = evaluate_class_pipeline(pipe, n=n, steps=50, guidance_scale=4.0, seed=0)
    m10 = evaluate_class_pipeline(pipe, n=200, steps=10, guidance_scale=4.0, seed=0)
    params = sum(p.numel() for p in pipe.transformer.parameters())
    metrics = {f"DDIM-50 CFG 4 accuracy ({n} samples)": m50["accuracy"], "DDIM-50 FID vs held-out digits": m50["fid"],
               "DDIM-10 CFG 4 accuracy (200 samples)": m10["accuracy"], "DDIM-10 FID": m10["fid"],
               "FID of held-out vs train digits (reference floor)": m50["fid_real_floor"],
               f"seconds to sample {n} images with DDIM-50 + CFG": m50["seconds"],
               "transformer parameters": params}
    write_card(out, "digits-dit",
               "Class-conditional latent DiT (`DiTTransformer2DModel`, labels 0-9, null label 1000) for diffusers' "
               "`DiTPipeline`, on `digits-vae` latents (4×8×8, patch 2 -> 16 tokens). Load with "
               "`mmskip.zoo.load('digits-dit')` (passes `id2label.json`).",
               f"scikit-learn `load_digits` train split, {COPIES} augmented copies encoded once by `digits-vae`.",
               f"6 DiT blocks, hidden 128 (4 heads × 32), adaLN-zero, {params / 1e6:.2f}M params; eps-prediction, "
               f"linear betas 1e-4..0.02, 1000 steps; label dropout 0.1; AdamW lr {LR} (3 % warm-up, cosine to 0; `mmskip.train.fit`), batch {BATCH}, "
               f"{steps} steps, grad clip 1, EMA {EMA} (the EMA weights are saved, fp16). Sampled with DDIM "
               "(trailing spacing).",
               metrics, wall, extra="\nAccuracy = the zoo `digits-classifier` agrees with the requested label; FID uses "
               "the classifier's 128-d penultimate features against the 300 held-out digits.\n")
    return metrics
