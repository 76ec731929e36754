"""Recipe for ``digits-sd``: a text-conditioned ``StableDiffusionPipeline`` on ``digits-vae`` latents."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mmskip.train import fit
from mmskip.zoo.card import write_card
from mmskip.zoo.data import DIGIT_NAMES, TEMPLATES, encode_augmented, load_split
from mmskip.zoo.sd_model import make_text_encoder, make_unet
from mmskip.zoo.sd_tokenizer import MAX_LENGTH, build_clip_tokenizer

from ._fit import RecipeTask, ema_copies, one_cycle
from .dit import make_scheduler

__all__ = ["train_sd"]

STEPS = 2500
BATCH = 64
LR = 1e-3
EMA = 0.999
COPIES = 8


class _TextDenoise(RecipeTask):
    """eps-prediction on noised latents conditioned on a caption of the digit (10 % empty prompts);
    UNet and text encoder train jointly."""

    def __init__(self, unet, text, lat: torch.Tensor, lab: torch.Tensor, cap_ids: torch.Tensor, empty: torch.Tensor,
                 seed: int) -> None:
        from diffusers import DDPMScheduler

        super().__init__({"unet": unet, "text": text}, seed, "digits-sd")
        self.unet, self.text, self.lat, self.lab, self.cap_ids, self.empty = unet, text, lat, lab, cap_ids, empty
        self.noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                                         beta_end=0.02)

    def draw(self, g: torch.Generator) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, len(self.lab), (BATCH,), generator=g)
        z0 = self.lat[idx]
        ids = self.cap_ids[self.lab[idx], torch.randint(0, len(TEMPLATES), (BATCH,), generator=g)]
        ids[torch.rand(BATCH, generator=g) < 0.1] = self.empty
        t = torch.randint(0, 1000, (BATCH,), generator=g)
        return {"z0": z0, "ids": ids, "t": t, "noise": torch.randn(z0.shape, generator=g)}

    def loss(self, b: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        cond = self.text(input_ids=b["ids"]).last_hidden_state
        pred = self.unet(self.noise_sched.add_noise(b["z0"], b["noise"], b["t"]), b["t"],
                         encoder_hidden_states=cond).sample
        return {"mse": F.mse_loss(pred, b["noise"])}


def train_sd(out: Path, steps: int = STEPS, seed: int = 0) -> dict:
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    from mmskip.zoo import path

    torch.manual_seed(seed)
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_clip_tokenizer(out / "tokenizer")
    vae = AutoencoderKL.from_pretrained(path("digits-vae"), dtype=torch.float32).eval()
    x, y = load_split("train")
    g = torch.Generator().manual_seed(seed)
    lat = encode_augmented(vae, x, COPIES, g)
    lab = y.repeat(COPIES)
    # token ids of every (digit, template) caption, and of the empty prompt (for classifier-free guidance)
    caps = [[t.format(name=DIGIT_NAMES[d], d=d) for t in TEMPLATES] for d in range(10)]
    enc = lambda s: tokenizer(s, padding="max_length", max_length=MAX_LENGTH, truncation=True,  # noqa: E731
                              return_tensors="pt").input_ids
    cap_ids = torch.stack([enc(c) for c in caps])  # (10, T, L)
    empty = enc([""])[0]
    unet = make_unet()
    text = make_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    task = _TextDenoise(unet, text, lat, lab, cap_ids, empty, seed)
    result = fit(task, one_cycle(steps, LR, pct_start=0.03, max_grad_norm=1.0, ema=EMA, ema_warmup=True,
                                 batch_size=BATCH, seed=seed))
    emas = ema_copies(task.modules, result.ema)
    ema_unet, ema_text = emas["unet"], emas["text"]
    wall = time.time() - t0
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=ema_text, tokenizer=tokenizer, unet=ema_unet,
                                   scheduler=make_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "train_info.json").write_text(json.dumps({"wall_time_s": wall, "steps": steps}) + "\n")
    return finish_card(out, wall, steps)


def finish_card(out: Path, wall: float, steps: int, n: int = 300) -> dict:
    """Measure the saved pipeline via prompts (accuracy, FID, CLIP score) and write its model card."""
    from mmskip.eval import conditional_accuracy, fid
    from mmskip.eval.clip_score import clip_score, load_clip
    from mmskip.eval.images import evaluate_class_pipeline, generate, labels_for, reference_images
    from mmskip.zoo import available
    from mmskip.zoo.data import caption
    from mmskip.zoo.loaders import LOADERS

    pipe = LOADERS["digits-sd"](out)
    labels = labels_for(n)
    t0 = time.perf_counter()
    imgs = generate(pipe, labels, steps=50, guidance_scale=4.0, seed=0)
    sample_s = time.perf_counter() - t0
    real = reference_images("test")
    m50 = {"accuracy": conditional_accuracy(imgs, labels), "fid": fid(real, imgs),
           "fid_real_floor": fid(real, reference_images("train"))}
    caps = [caption(c) for c in labels]
    wrong = [caption((c + 1) % 10) for c in labels]
    clip_metrics = {}
    if "digits-clip" in available():
        clip = load_clip("digits-clip")
        clip_metrics = {"CLIP score (digits-clip), matching prompt": clip_score(imgs, caps, clip),
                        "CLIP score, wrong digit's prompt": clip_score(imgs, wrong, clip)}
    m10 = evaluate_class_pipeline(pipe, n=200, steps=10, guidance_scale=4.0, seed=0)
    unet_p = sum(p.numel() for p in pipe.unet.parameters())
    text_p = sum(p.numel() for p in pipe.text_encoder.parameters())
    metrics = {f"DDIM-50 CFG 4 accuracy via prompts ({n} samples)": m50["accuracy"],
               "DDIM-50 FID vs held-out digits": m50["fid"],
               "DDIM-10 CFG 4 accuracy (200 samples)": m10["accuracy"], "DDIM-10 FID": m10["fid"],
               **clip_metrics,
               "FID of held-out vs train digits (reference floor)": m50["fid_real_floor"],
               f"seconds to sample {n} images with DDIM-50 + CFG": sample_s,
               "unet parameters": unet_p, "text encoder parameters": text_p}
    write_card(out, "digits-sd",
               "Text-conditioned `StableDiffusionPipeline` for prompts like \"a handwritten digit seven\": "
               "`UNet2DConditionModel` on `digits-vae` latents (4×8×8), a tiny `CLIPTextModel` and a real "
               "`CLIPTokenizer` whose vocab.json/merges.txt were trained on the project's caption vocabulary "
               "(`mmskip.zoo.sd_tokenizer`).",
               f"scikit-learn `load_digits` train split, {COPIES} augmented copies encoded once by `digits-vae`; "
               "captions from the templates of `digits-clip` (name or numeral), 10 % empty prompts.",
               f"UNet blocks 48/96 (cross-attention at 8×8 and in the mid block), text encoder 2×128; trained "
               f"jointly from scratch, eps-prediction, linear betas 1e-4..0.02; AdamW lr {LR} (3 % warm-up, cosine to 0; `mmskip.train.fit`), batch "
               f"{BATCH}, {steps} steps, EMA {EMA} (EMA weights saved, fp16). DDIM (trailing) scheduler.",
               metrics, wall, extra="\nAccuracy = the zoo `digits-classifier` sees the prompted digit; FID uses the "
               "classifier's penultimate features against the 300 held-out digits.\n")
    return metrics
