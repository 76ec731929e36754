"""Recipe for ``digits-llava``: a tiny LLaVA (``LlavaForConditionalGeneration``) answering questions about
4×4 grids of digits (see :mod:`mmskip.zoo.llava_data`), trained from scratch.

Two stages (:mod:`recipes._vlm_stages`): a vision warm-up of the vision tower and projector on a
training-only probe's digit loss, then the whole model on the answers. ``mmskip zoo digits-llava
--device cuda`` trains on a GPU in minutes (bf16 autocast); on a CPU, ``train_llava(...,
save_every=N)`` checkpoints, and a rerun continues.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mmskip.train import TrainConfig, fit
from mmskip.zoo import llava_data as D
from mmskip.zoo.card import write_card
from mmskip.zoo.llava_data import COPIES, PALETTE
from mmskip.zoo.llava_model import make_model
from mmskip.zoo.word_tokenizer import majority_baseline as _majority

from ._fit import step_generator
from ._vlm_stages import StageTask, spread_loss

__all__ = ["STEPS", "VISION_STEPS", "BATCH", "attention_loss", "evaluate", "probe_loss", "train_llava"]

STEPS = {"cuda": 4000, "cpu": 8000}  # steps of the whole model
VISION_STEPS = {"cuda": 1000, "cpu": 1000}  # vision warm-up steps before them (see train_llava)
BATCH = {"cuda": 512, "cpu": 16}  # grids a step (a vision warm-up step: 2 × BATCH grids, no text)
LR = 1e-3
AUX = 0.5  # weight of the probe's digit loss on the projector's output (a training-only linear probe)
WARMUP = 200
ATTN = 1.0  # weight of the training-only attention loss (see attention_loss)
ATTN_LAYER, ATTN_HEADS = 3, 2  # the decoder layer whose first ATTN_HEADS heads it supervises


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def evaluate(model, batch: D.Batch, device: torch.device | str = "cpu", chunk: int = 250) -> dict[str, float]:
    """Teacher-forced accuracy of the answer token (= greedy first token), overall and per question type."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    correct = []
    for i in range(0, len(batch.answers), chunk):
        ids = batch.input_ids[i:i + chunk].to(device)
        pos = batch.answer_pos[i:i + chunk].to(device)
        with _autocast(device):
            logits = model(input_ids=ids, attention_mask=batch.attention_mask[i:i + chunk].to(device),
                           pixel_values=batch.pixel_values[i:i + chunk].to(device)).logits
        pred = logits[torch.arange(len(ids), device=device), pos - 1].argmax(-1)
        correct.append((pred == ids[torch.arange(len(ids), device=device), pos]).cpu())
    correct = torch.cat(correct).float()
    model.train(was_training)
    res = {"all": correct.mean().item()}
    for t in D.QTYPES:
        m = torch.tensor([q == t for q in batch.qtypes])
        if m.any():
            res[t] = correct[m].mean().item()
    return res


def save_and_score(model, tok, out: Path, dev: torch.device, evaluate_fn, heldout, train_probe, qtypes, chance: dict,
                   n_eval: int, train_name: str) -> tuple[dict[str, float], dict]:
    """The end of a zoo VLM recipe: evaluate the weights as they will be saved (fp16), write model and
    tokenizer to ``out``, and return the held-out accuracy and the card's accuracy and size metrics."""
    model.to(torch.float16).float()  # evaluate the weights exactly as saved
    acc = evaluate_fn(model, heldout, dev)
    acc_train = evaluate_fn(model, train_probe, dev)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out, safe_serialization=True, max_shard_size="16MB")
    tok.save_pretrained(out)
    model.float()
    metrics = {f"held-out accuracy, all ({len(heldout.answers)} questions)": acc["all"]}
    metrics.update({f"held-out accuracy, {t} ({n_eval})": acc[t] for t in qtypes})
    metrics.update({f"majority-answer baseline, {t}": chance[t] for t in qtypes})
    metrics.update({f"{train_name} accuracy, {t}": acc_train[t] for t in qtypes})
    metrics.update({
        "parameters": sum(p.numel() for p in model.parameters()),
        "vision tower parameters": sum(p.numel() for p in model.model.vision_tower.parameters()),
        "language model parameters": sum(p.numel() for p in model.model.language_model.parameters())
        + model.lm_head.weight.numel(),
    })
    return acc, metrics


def majority_baseline(batch: D.Batch) -> dict[str, float]:
    """Accuracy of always giving the most frequent answer of each question type (the chance level)."""
    return _majority(batch.answers, batch.qtypes, D.QTYPES)


def _patch_labels(grid: torch.Tensor) -> torch.Tensor:
    """Cell labels ``(n, 4, 4)`` -> the label of each of the 64 patches (row-major), ``(n, 64)``."""
    per = D.IMAGE_SIZE // D.PATCH // D.GRID  # patches per cell side (2)
    return grid.repeat_interleave(per, 1).repeat_interleave(per, 2).flatten(1)


PROBE_OUT = 10 + 2 * D.GRID  # the probe's outputs: 10 digits, then the cell's row (4), then its column (4)


def probe_loss(probe: torch.nn.Module, feats: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """The vision side's training signal: ``probe`` (linear, :data:`PROBE_OUT` outputs) on the projector's
    output ``feats`` ``(n, 64, d)``: each patch -> its cell's digit (``cells``, :func:`_patch_labels`), its
    cell's row and its cell's column, plus the mean of a cell's 2×2 patches -> the cell's digit. (The
    position terms make each token say where it is, so a question's row/column can find it by content.)"""
    n, per = len(feats), D.IMAGE_SIZE // D.PATCH // D.GRID
    logits = probe(feats).float()  # (n, 64, PROBE_OUT)
    cell_of = _patch_labels(torch.arange(D.GRID ** 2).reshape(1, D.GRID, D.GRID)).to(feats.device).expand(n, -1)
    rows, cols = cell_of // D.GRID, cell_of % D.GRID
    per_patch = F.cross_entropy(logits[..., :10].flatten(0, 1), cells.flatten())
    row = F.cross_entropy(logits[..., 10:10 + D.GRID].flatten(0, 1), rows.flatten())
    col = F.cross_entropy(logits[..., 10 + D.GRID:].flatten(0, 1), cols.flatten())
    cell_feats = feats.reshape(n, D.GRID, per, D.GRID, per, -1).mean((2, 4)).flatten(1, 2)  # (n, 16, d)
    cell_digit = cells.reshape(n, D.GRID, per, D.GRID, per)[:, :, 0, :, 0].flatten(1)
    per_cell = F.cross_entropy(probe(cell_feats)[..., :10].flatten(0, 1).float(), cell_digit.flatten())
    return per_patch + per_cell + row + col


def attention_targets(questions: list[str]) -> torch.Tensor:
    """``(n, 64)`` booleans: the patches of the cells each question names (:func:`D.question_cells`: one
    cell, a row or column, or every cell for ``count``)."""
    return _patch_labels(torch.stack([D.question_cells(q) for q in questions]).long()).bool()


def attention_loss(attn: torch.Tensor, answer_pos: torch.Tensor, image: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor:
    """Where the answer is read: how far the attention of the position predicting the answer
    (``answer_pos - 1``) over the 64 image tokens is from an even spread over the patches of the cells its
    question names (``targets`` ``(n, 64)``, :func:`attention_targets`), ``KL(uniform on the targets ||
    attention)``, 0 only at that spread; averaged over the heads of ``attn`` ``(n, H, L, L)`` and the
    questions. ``image`` ``(n, L)`` marks each row's 64 image tokens. The training-only signal that teaches
    the reading: a cell's digit, a row's or column's four digits evenly (their sum), every cell evenly
    (a count). Without it the model answers the grid's most frequent digit."""
    n = len(attn)
    rows = attn[torch.arange(n, device=attn.device), :, answer_pos - 1].float()  # (n, H, L)
    return spread_loss(rows.masked_select(image[:, None, :]).view(n, rows.shape[1], D.N_IMAGE_TOKENS), targets)


def _vision_draw(bank, batch: int, seed: int):
    """Step-seeded vision warm-up batches: ``2 * batch`` grids of any of the 10 classes (pixels, patch labels)."""
    def draw(step: int) -> list[torch.Tensor]:
        images, labels = D.make_grids(bank, 2 * batch, step_generator(seed, step), palette=(10, 10))
        return [D.pixel_values(images), _patch_labels(labels)]
    return draw


def _question_draw(tok, bank, batch: int, seed: int, palette: tuple[int, int] = PALETTE):
    """Step-seeded question batches (so a resumed run draws what an uninterrupted one would)."""
    def draw(step: int) -> list[torch.Tensor]:
        g = step_generator(seed + 1, step)
        images, labels = D.make_grids(bank, batch, g, palette=palette)
        qs, answers, qtypes = D.sample_questions(labels, g)
        b = D.make_batch(tok, images, qs, answers, qtypes)
        return [b.pixel_values, b.input_ids, b.attention_mask, b.labels, _patch_labels(labels),
                attention_targets(qs)]
    return draw


class _LlavaTask(StageTask):
    """A stage of the recipe (:class:`recipes._vlm_stages.StageTask`) on LLaVA's ``pixel_values``; ``attn > 0``
    adds ``attn`` × :func:`attention_loss` on decoder layer ``ATTN_LAYER``'s first ``ATTN_HEADS`` heads."""

    def __init__(self, *args, image_token: int = -1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.image_token = image_token

    def encode(self, pixels: torch.Tensor) -> None:
        self.model.model.get_image_features(pixel_values=pixels)

    def answer_loss(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                    labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels,
                         output_attentions=bool(self.attn))
        if self.attn:
            layer = min(ATTN_LAYER, len(out.attentions) - 1)
            answer_pos = (labels != -100).int().argmax(1)  # the answer token: the first labelled one
            self.extra_terms["attention"] = self.attn * attention_loss(
                out.attentions[layer][:, :ATTN_HEADS], answer_pos, ids == self.image_token, targets)
        return out.loss

    def probe_loss(self, feats: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        return probe_loss(self.probe, feats, cells)


@torch.no_grad()
def _probe_accuracy(task: _LlavaTask, pixels: torch.Tensor, grid: torch.Tensor, device: torch.device,
                    chunk: int = 250) -> float:
    """How often the probe reads a cell's digit (``grid``, ``(n, 4, 4)``) from the mean of its 2×2
    projected patches of ``pixels``."""
    model, per = task.model, D.IMAGE_SIZE // D.PATCH // D.GRID
    was_training = model.training
    model.eval()
    preds = []
    with task.hooked():
        for i in range(0, len(pixels), chunk):
            with _autocast(device):
                task.encode(pixels[i:i + chunk].to(device))
            feats = task.captured["feats"]
            cell_feats = feats.reshape(len(feats), D.GRID, per, D.GRID, per, -1).mean((2, 4)).flatten(1, 2)
            preds.append(task.probe(cell_feats)[..., :10].argmax(-1).cpu())
    model.train(was_training)
    return (torch.cat(preds) == grid.flatten(1)).float().mean().item()


def train_llava(out: Path, steps: int | None = None, batch: int | None = None, device: str | None = None,
                seed: int = 0, size: str = "base", n_eval: int = 500, lr: float = LR,
                palette: tuple[int, int] = PALETTE, aux: float = AUX, vision_steps: int | None = None,
                attn: float = ATTN, save_every: int = 0, eval_every: int = 0) -> dict:
    """Train ``digits-llava`` into ``out`` and write its model card; returns the metrics.

    Two stages (:mod:`recipes._vlm_stages`): ``vision_steps`` steps of the vision tower and projector alone
    on the probe's digit loss (:func:`probe_loss`), then ``steps`` steps of the whole model on the answers
    (+ ``aux`` × the probe's loss + ``attn`` × :func:`attention_loss`). ``save_every > 0`` checkpoints each
    stage under ``out/training`` every that many steps, and a rerun with the same arguments continues from
    there. ``eval_every > 0`` prints held-out accuracy (100 questions a type) every that many whole-model steps.

    ``device`` defaults to ``cpu``; ``steps``/``batch`` default to :data:`STEPS`/:data:`BATCH` of that
    device type; ``vision_steps`` to :data:`VISION_STEPS`, scaled by ``steps / STEPS`` when ``steps`` is
    given. ``size="tiny"`` and a small ``n_eval`` (questions per type) are for tests."""
    dev = torch.device(device or "cpu")
    kind = dev.type if dev.type in STEPS else "cpu"
    if vision_steps is None:
        vision_steps = VISION_STEPS[kind] if steps is None else round(steps * VISION_STEPS[kind] / STEPS[kind])
    steps = steps if steps is not None else STEPS[kind]
    batch = batch if batch is not None else BATCH[kind]
    torch.manual_seed(seed)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t0 = time.time()
    tok = D.build_tokenizer()
    bank = D.digit_bank("train", copies=COPIES, seed=seed)
    heldout = D.heldout_set(tok, n_per_type=n_eval, seed=1234, split="test")
    train_probe = D.heldout_set(tok, n_per_type=max(1, n_eval // 2), seed=4321, split="train")
    probe_images, probe_grid = D.make_grids(D.digit_bank("test"), 200, torch.Generator().manual_seed(99))
    model = make_model(size).to(dev)
    model.train()
    # Real LLaVAs start from a pretrained vision encoder; here a linear probe on the projector's output
    # (64 tokens -> the digit of each token's cell) gives the vision side that signal. The probe is
    # dropped after training: the saved model is a plain LlavaForConditionalGeneration.
    probe = torch.nn.Linear(model.config.text_config.hidden_size, PROBE_OUT).to(dev)
    warm, warm_v = min(WARMUP, max(1, steps // 10)), min(WARMUP, max(1, vision_steps // 10))
    common = {"lr": lr, "betas": (0.9, 0.98), "weight_decay": 0.05, "max_grad_norm": 1.0, "seed": seed,
              "cpu": dev.type == "cpu", "mixed_precision": "bf16" if dev.type == "cuda" else "no",
              "save_every": save_every}
    ckpt = Path(out) / "training" if save_every else None
    small = D.heldout_set(tok, n_per_type=100, seed=1234, split="test") if eval_every else None
    probe_acc: dict[str, float] = {}
    # stage 1: the vision tower and projector alone, warm-up then a flat lr; stage 2: the whole model,
    # warm-up then cosine to 5 %. One fit (fresh AdamW) per stage.
    vision = _LlavaTask(model, probe, _vision_draw(bank, batch, seed), aux, vision_steps, True, "digits-llava", seed)
    t_vision = 0.0
    if vision_steps:
        t_vision = fit(vision, TrainConfig(steps=vision_steps, warmup=warm_v, min_lr_ratio=1.0, batch_size=2 * batch,
                                           **common), out=ckpt and ckpt / "vision", resume=ckpt is not None).seconds
    probe_acc["after the vision warm-up"] = _probe_accuracy(vision, D.pixel_values(probe_images), probe_grid, dev)
    print(f"probe: held-out cell digit accuracy after the vision warm-up {probe_acc['after the vision warm-up']:.3f}",
          flush=True)
    whole = _LlavaTask(model, probe, _question_draw(tok, bank, batch, seed, palette), aux, steps, False,
                       "digits-llava", seed, evaluate_fn=small and (lambda: evaluate(model, small, dev)),
                       attn=attn, image_token=model.config.image_token_index)
    t_whole = fit(whole, TrainConfig(steps=steps, warmup=warm, min_lr_ratio=0.05, batch_size=batch,
                                     eval_every=eval_every, **common),
                  out=ckpt and ckpt / "whole", resume=ckpt is not None).seconds
    vision_curve, curve = vision.curve, whole.curve
    probe_acc["at the end"] = _probe_accuracy(whole, D.pixel_values(probe_images), probe_grid, dev)
    train_s = t_vision + t_whole
    chance = majority_baseline(heldout)
    acc, metrics = save_and_score(model, tok, out, dev, evaluate, heldout, train_probe, D.QTYPES, chance, n_eval,
                                  "train-digit grids")
    wall = max(time.time() - t0, train_s)  # a resumed run counts the runs before it
    out = Path(out)
    n_params, n_vision, n_text = (metrics[k] for k in ("parameters", "vision tower parameters", "language model parameters"))
    n_threads = torch.get_num_threads()
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else \
        f"CPU ({n_threads} thread{'s' if n_threads > 1 else ''})"
    metrics.update({"vision warm-up steps": vision_steps, "steps": steps, "batch": batch, "device": where,
                    "training seconds": round(train_s, 1), "vision warm-up seconds": round(t_vision, 1),
                    "seconds per step (whole model)": round(t_whole / steps, 4),
                    "final train loss (language model)": curve[-1][1]})
    metrics.update({f"probe: held-out cell digit accuracy, {k}": v for k, v in probe_acc.items()})
    vc, tc = model.config.vision_config, model.config.text_config
    write_card(out, "digits-llava",
               "Tiny LLaVA (`LlavaForConditionalGeneration`: CLIP vision tower, LLaVA MLP projector, Llama) that "
               "answers questions about 4×4 grids of handwritten digits; 64 vision tokens per image, and the "
               "answers need the right ones (for vision-token dropping / p-MoD research). "
               "`mmskip.zoo.load('digits-llava')` returns `(model, tokenizer)` (float32, eval); build inputs with "
               "`mmskip.zoo.llava_data.encode(tokenizer, images, questions)` or ask with "
               "`llava_data.answer(model, tokenizer, images, questions)`.",
               "Images: 4×4 grids of scikit-learn 8×8 digits -> 32×32 grey (3 equal channels, [-1, 1]); each grid "
               f"draws its cells from a random palette of classes ({palette[0]}-{palette[1]} in training, 3-10 in the "
               "held-out set). Train grids use the zoo's train digits "
               f"(+ {COPIES - 1} lightly augmented copies), held-out grids only the 300 held-out digits (split of "
               "`mmskip.zoo.data`). Questions (one answer token, then `</s>`): `what digit is in rowR columnC ?` "
               "(0-9), `how many D are there ?` (0-16), `what is the sum of rowK|columnK ?` (0-36); sampled "
               f"50/25/25 %. Prompt: `{D.prompt_text('QUESTION').replace(D.IMAGE_TOKEN * D.N_IMAGE_TOKENS, '<image>×64')}`"
               f" (after `<s>`). Word-level tokenizer ({len(tok)} tokens). Generated from seeds (train stream seed "
               f"{seed}, held-out seed 1234); nothing is shipped.",
               f"Vision: CLIP, {vc.num_hidden_layers} layers, d={vc.hidden_size}, patch {vc.patch_size} on "
               f"{vc.image_size}×{vc.image_size} (64 tokens + CLS, CLS dropped; last layer's features). Projector: "
               f"LLaVA 2-layer GELU MLP. Text: Llama, {tc.num_hidden_layers} layers, d={tc.hidden_size}, "
               f"{tc.num_attention_heads} heads, SwiGLU {tc.intermediate_size}. {n_params / 1e6:.2f}M parameters "
               f"(vision {n_vision / 1e6:.2f}M, text {n_text / 1e6:.2f}M), all trained from scratch. AdamW lr {lr} "
               "(β 0.9/0.98, wd 0.05 on matrices; a fresh AdamW per stage, each one `mmskip.train.fit`), grad clip 1. "
               "A training-only linear probe on the projector's output (not saved) stands in for the pretrained "
               "vision encoder a real LLaVA starts from: its loss is a per-patch loss (each of the 64 vision tokens -> "
               "its cell's digit, its cell's row and its cell's column) plus a cell loss (the mean of a cell's 2×2 "
               "tokens -> its digit). Stage 1, "
               f"vision warm-up: {vision_steps} steps of the vision tower + projector alone on the probe's loss "
               f"({2 * batch} grids of any of the 10 classes a step, {warm_v} warm-up steps, then flat). Stage 2: "
               f"{steps} steps of the whole model, batch {batch}, loss on the answer token and `</s>` + {aux} × the "
               f"probe's loss"
               + (f" + {attn} × a training-only attention loss (decoder layer {ATTN_LAYER}, heads 0-{ATTN_HEADS - 1}: "
                  "the position that predicts the answer is taught to spread its attention evenly over the tokens of "
                  "the cells its question names: KL(even spread || attention); one cell, a row or column, every cell "
                  "for count)" if attn else "")
               + f", {warm} warm-up steps, cosine to 5 %"
               f"{'; bf16 autocast' if dev.type == 'cuda' else ''}. Saved in fp16.",
               metrics, wall,
               extra="\nAccuracy is greedy (argmax) on the answer token. Majority-answer baseline = always giving "
               "the most frequent answer of that question type (chance level). The probe rows measure the vision "
               "side alone: how often the training probe reads a held-out cell's digit from its tokens (200 "
               "held-out grids).\n\n"
               "## Vision warm-up loss (step, probe loss)\n" + ", ".join(f"{s}: {v}" for s, v in vision_curve) + "\n\n"
               "## Training loss (step, language-model loss on answer + `</s>`; probe loss excluded)\n" + ", ".join(f"{s}: {v}" for s, v in curve) + "\n")
    card = out / "README.md"
    text = re.sub(r"^Training wall time: .*$", f"Training wall time: {wall / 60:.1f} min in all ({train_s / 60:.1f} min "
                  f"of training steps) on {where}.", card.read_text(), flags=re.M)
    cmd = (f"mmskip zoo digits-llava{' --device cuda' if dev.type == 'cuda' else ''}"
           f"{'' if steps == STEPS[kind] else f' --steps {steps}'}{'' if batch == BATCH[kind] else f' --batch {batch}'}")
    text = re.sub(r"^Reproduce: .*$", f"Reproduce: `{cmd}` (fixed seeds; bf16 on a GPU, so not bit-exact).",
                  text, flags=re.M)
    card.write_text(text)
    print(f"held-out accuracy: {acc}  (majority baseline {chance})")
    return metrics
