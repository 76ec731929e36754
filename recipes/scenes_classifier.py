"""Recipe for ``scenes-classifier``: reads colour, shape, count and relation of procedural scenes."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mmskip.zoo.card import write_card
from mmskip.zoo.scenes_classifier import HEADS, ScenesClassifier, prompt_accuracy, scene_targets
from mmskip.zoo.scenes_data import make_split, scenes_tensor

__all__ = ["train_scenes_classifier"]

STEPS = 1200
BATCH = 96
LR = 2e-3
N_TRAIN = 12000


def train_scenes_classifier(out: Path, steps: int = STEPS, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    t0 = time.time()
    images, _, scenes = make_split("train", N_TRAIN)
    x, y = scenes_tensor(images), scene_targets(scenes)
    test_images, _, test_scenes = make_split("test", 1000)
    model = ScenesClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in (bar := tqdm(range(steps), desc="scenes-classifier")):
        idx = torch.randint(0, len(x), (BATCH,), generator=g)
        xb = x[idx] + 0.03 * torch.randn(x[idx].shape, generator=g)
        logits = model(xb)
        loss = sum(F.cross_entropy(logits[k], y[k][idx], ignore_index=-100) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    acc = prompt_accuracy(model, scenes_tensor(test_images), test_scenes)
    wall = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    n = sum(p.numel() for p in model.parameters())
    metrics = {f"held-out accuracy: {k}": v for k, v in acc.items()} | {"parameters": n}
    write_card(out, "scenes-classifier",
               "CNN reading a 3×32×32 scene back: colour, shape and count of each group and their relation. Scores "
               "prompt following of `scenes-flux`; its 128-d penultimate features are the FID features for scenes.",
               f"{N_TRAIN} procedural scenes (`mmskip.zoo.scenes_data`, train seed); 1000 held-out (test seed).",
               f"3 conv stages (24/48/64), {n / 1e6:.2f}M params, one linear head per attribute, summed cross-"
               f"entropy; AdamW one-cycle lr {LR}, batch {BATCH}, {steps} steps, light noise augmentation. fp16.",
               metrics, wall)
    return metrics
