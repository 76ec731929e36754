"""Recipe for ``digits-clip``: contrastive training of the tiny open_clip model on digits and captions."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mmskip.train import fit
from mmskip.zoo.card import write_card
from mmskip.zoo.clip_model import PREPROCESS, ROWS_KEY, create, model_config
from mmskip.zoo.data import DIGIT_NAMES, TEMPLATES, augment, caption, load_split

from ._fit import RecipeTask, one_cycle

__all__ = ["train_clip", "zero_shot_accuracy"]

STEPS = 800
BATCH = 128
LR = 1e-3



@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, x: torch.Tensor, y: torch.Tensor) -> float:
    """Zero-shot accuracy on images ``x`` in [-1, 1] with the captions ``caption(label)``."""
    model.eval()
    txt = F.normalize(model.encode_text(tokenizer([caption(i) for i in range(10)])), dim=-1)
    img = F.normalize(model.encode_image(x.repeat(1, 3, 1, 1)), dim=-1)
    return float(((img @ txt.T).argmax(-1) == y).float().mean())


class _Contrast(RecipeTask):
    """CLIP's symmetric contrastive loss where every caption of the same digit is a positive."""

    def __init__(self, model, x: torch.Tensor, y: torch.Tensor, tok: torch.Tensor, seed: int) -> None:
        super().__init__({"model": model}, seed, "digits-clip")
        self.model, self.x, self.y, self.tok = model, x, y, tok

    def draw(self, g: torch.Generator) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, len(self.y), (BATCH,), generator=g)
        tmpl = torch.randint(0, len(TEMPLATES), (BATCH,), generator=g)
        return {"x": augment(self.x[idx], g), "lab": self.y[idx], "tmpl": tmpl}

    def loss(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        lab = batch["lab"]
        img = F.normalize(self.model.encode_image(batch["x"].repeat(1, 3, 1, 1)), dim=-1)
        txt = F.normalize(self.model.encode_text(self.tok[lab, batch["tmpl"]]), dim=-1)
        logits = self.model.logit_scale.exp() * img @ txt.T
        same = (lab[:, None] == lab[None, :]).float()
        target = same / same.sum(1, keepdim=True)  # every caption of the same digit is a positive
        return {"contrastive": 0.5 * (torch.sum(-target * logits.log_softmax(1), 1).mean()
                                      + torch.sum(-target * logits.T.log_softmax(1), 1).mean())}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        self.model.logit_scale.clamp_(0, 4.6052)


def train_clip(out: Path, steps: int = STEPS, seed: int = 0) -> dict:
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    t0 = time.time()
    x, y = load_split("train")
    xt, yt = load_split("test")
    model, _, tokenizer = create()
    texts = [[t.format(name=DIGIT_NAMES[c], d=c) for t in TEMPLATES] for c in range(10)]
    tok = torch.stack([tokenizer(texts[c]) for c in range(10)])  # (10, T, ctx)
    fit(_Contrast(model, x, y, tok, seed), one_cycle(steps, LR, pct_start=0.05, weight_decay=0.05, batch_size=BATCH,
                                                    seed=seed))
    acc = zero_shot_accuracy(model, tokenizer, xt, yt)
    wall = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    # only the token-embedding rows of the training captions ever got a gradient: ship those
    rows = torch.unique(tok.flatten())
    state["token_embedding.weight"] = state["token_embedding.weight"][rows].contiguous()
    state[ROWS_KEY] = rows.to(torch.int64)
    save_file(state, str(out / "open_clip_model.safetensors"))
    (out / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_config(), "preprocess_cfg": PREPROCESS}, indent=2) + "\n")
    reloaded, _, tk = create(out)
    acc16 = zero_shot_accuracy(reloaded.float(), tk, xt, yt)
    n = sum(p.numel() for p in model.parameters())
    metrics = {"held-out zero-shot accuracy ('a handwritten digit <name>')": acc,
               "same, fp16 weights reloaded": acc16, "parameters": n}
    write_card(out, "digits-clip",
               "Tiny open_clip model (ViT 4×128, patch 8 on 32×32; text transformer 3×128, open_clip's BPE "
               "tokenizer, context 16; 64-d embeddings). Architecture `digits-clip` registered with open_clip by "
               "`mmskip.zoo.clip_model.register()`; the folder is also a standard open_clip `local-dir:`.",
               "scikit-learn `load_digits` train split (augmented), captions from templates "
               f"{TEMPLATES} with the digit's name or numeral. Images: grey repeated to 3 channels, mean/std 0.5.",
               f"CLIP contrastive loss where all captions of the same digit in the batch count as positives "
               f"(soft targets), AdamW lr {LR} (5 % warm-up, cosine to 0; `mmskip.train.fit`), batch {BATCH}, {steps} steps, logit scale ≤ 100. "
               "Saved in fp16.",
               metrics, wall)
    return metrics
