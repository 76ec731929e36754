"""Recipe for ``scenes-classifier``: reads colour, shape, count and relation of procedural scenes."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mmskip.train import fit
from mmskip.zoo.card import write_card
from mmskip.zoo.scenes_classifier import HEADS, ScenesClassifier, prompt_accuracy, scene_targets
from mmskip.zoo.scenes_data import make_split, scenes_tensor

from ._fit import RecipeTask, one_cycle

__all__ = ["train_scenes_classifier"]

STEPS = 1200
BATCH = 96
LR = 2e-3
N_TRAIN = 12000


class _Read(RecipeTask):
    """Summed cross-entropy of every head on lightly noised train scenes."""

    def __init__(self, model: ScenesClassifier, x: torch.Tensor, y: dict[str, torch.Tensor], seed: int) -> None:
        super().__init__({"model": model}, seed, "scenes-classifier")
        self.model, self.x, self.y = model, x, y

    def draw(self, g: torch.Generator) -> dict:
        idx = torch.randint(0, len(self.x), (BATCH,), generator=g)
        return {"x": self.x[idx] + 0.03 * torch.randn(self.x[idx].shape, generator=g),
                "y": {k: self.y[k][idx] for k in HEADS}}

    def loss(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        logits = self.model(batch["x"])
        return {k: F.cross_entropy(logits[k], batch["y"][k], ignore_index=-100) for k in HEADS}


def train_scenes_classifier(out: Path, steps: int = STEPS, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    t0 = time.time()
    images, _, scenes = make_split("train", N_TRAIN)
    x, y = scenes_tensor(images), scene_targets(scenes)
    test_images, _, test_scenes = make_split("test", 1000)
    model = ScenesClassifier()
    fit(_Read(model, x, y, seed), one_cycle(steps, LR, pct_start=0.05, weight_decay=1e-4, batch_size=BATCH, seed=seed))
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
               f"entropy; AdamW lr {LR} (5 % warm-up, cosine to 0; `mmskip.train.fit`), batch {BATCH}, {steps} steps, light noise augmentation. fp16.",
               metrics, wall)
    return metrics
