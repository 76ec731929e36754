"""Recipe for ``digits-llava``: a tiny LLaVA (``LlavaForConditionalGeneration``) answering questions about
4×4 grids of digits (see :mod:`mmskip.zoo.llava_data`), trained from scratch.

``mmskip zoo digits-llava --device cuda`` trains the shipped model on a GPU in a few
minutes (bf16 autocast, batch 256); the CPU default (batch 32) is for testing the recipe.
"""

from __future__ import annotations

import queue
import re
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mmskip.train import TrainConfig, TrainTask, fit
from mmskip.zoo import llava_data as D
from mmskip.zoo.card import write_card
from mmskip.zoo.llava_data import COPIES, PALETTE
from mmskip.zoo.llava_model import make_model
from mmskip.zoo.word_tokenizer import majority_baseline as _majority

__all__ = ["STEPS", "BATCH", "evaluate", "train_llava"]

STEPS = {"cuda": 3000, "cpu": 3000}
BATCH = {"cuda": 512, "cpu": 32}
LR = 1e-3
AUX = 0.5  # weight of the per-patch digit loss on the projector's output (a training-only linear probe)
WARMUP = 200



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


def _batches(tok, bank, batch: int, steps: int, seed: int, pin: bool, palette: tuple[int, int] = PALETTE):
    """Training batches made by a background thread (fixed seed, so the same stream on any device)."""
    q: queue.Queue = queue.Queue(maxsize=8)

    def work():
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            images, labels = D.make_grids(bank, batch, g, palette=palette)
            b = D.make_batch(tok, images, *D.sample_questions(labels, g))
            if pin:
                b = D.Batch(b.pixel_values.pin_memory(), b.input_ids.pin_memory(), b.attention_mask.pin_memory(),
                            b.labels.pin_memory(), b.answer_pos, b.qtypes, b.questions, b.answers)
            q.put((b, labels))

    threading.Thread(target=work, daemon=True).start()
    for _ in range(steps):
        yield q.get()


def decay_groups(named: list[tuple[str, torch.Tensor]], weight_decay: float) -> list[dict]:
    """AdamW groups of the VLM recipes: ``weight_decay`` on matrices except embeddings, none elsewhere."""
    decay = [p for n, p in named if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in named if not (p.dim() >= 2 and "embed" not in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


class _AnswerTask(TrainTask):
    """The answer-token loss plus ``aux`` × the probe's per-patch digit loss on the projector's output.

    Batches come in order from the recipe's background stream (its runs are not resumed)."""

    desc = "digits-llava"

    def __init__(self, model, probe: torch.nn.Module, stream, aux: float, every: int, steps: int) -> None:
        self.model, self.probe, self.stream, self.aux, self.every, self.steps = model, probe, stream, aux, every, steps
        self.captured: dict[str, torch.Tensor] = {}
        self.curve: list[tuple[int, float]] = []
        self.hook = None

    def weights(self) -> dict[str, torch.Tensor]:
        return dict(list(self.model.named_parameters()) + [(f"probe.{n}", p) for n, p in self.probe.named_parameters()])

    def param_groups(self, config: TrainConfig) -> list[dict]:
        return decay_groups(list(self.weights().items()), config.weight_decay)

    def prepare(self, accelerator) -> None:
        self.device = accelerator.device
        self.model.to(self.device).train()
        self.probe.to(self.device)
        self.hook = self.model.model.multi_modal_projector.register_forward_hook(
            lambda mod, args, output: self.captured.__setitem__("feats", output))

    def batch(self, step: int):
        return next(self.stream)

    def loss(self, item, step: int) -> dict[str, torch.Tensor]:
        b, grid = item
        b = b.to(self.device)
        lm = self.model(input_ids=b.input_ids, attention_mask=b.attention_mask, pixel_values=b.pixel_values,
                        labels=b.labels).loss
        self.lm = lm.detach()
        if not self.aux:
            return {"lm": lm}
        cells = _patch_labels(grid).to(self.device, non_blocking=True)
        return {"lm": lm, "probe": self.aux * F.cross_entropy(self.probe(self.captured["feats"]).flatten(0, 1).float(),
                                                              cells.flatten())}

    def after_step(self, step: int) -> None:
        if step % self.every == 0 or step == self.steps - 1:
            self.curve.append((step + 1, round(self.lm.item(), 4)))

    def finish(self) -> None:
        if self.hook is not None:
            self.hook.remove()


def train_llava(out: Path, steps: int | None = None, batch: int | None = None, device: str | None = None,
                seed: int = 0, size: str = "base", n_eval: int = 500, lr: float = LR,
                palette: tuple[int, int] = PALETTE, aux: float = AUX) -> dict:
    """Train ``digits-llava`` into ``out`` and write its model card; returns the metrics.

    ``device`` defaults to ``cpu``; ``steps``/``batch`` default to :data:`STEPS`/:data:`BATCH` of that
    device type. ``size="tiny"`` and a small ``n_eval`` (questions per type) are for tests."""
    dev = torch.device(device or "cpu")
    steps = steps if steps is not None else STEPS[dev.type if dev.type in STEPS else "cpu"]
    batch = batch if batch is not None else BATCH[dev.type if dev.type in BATCH else "cpu"]
    torch.manual_seed(seed)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t0 = time.time()
    tok = D.build_tokenizer()
    bank = D.digit_bank("train", copies=COPIES, seed=seed)
    heldout = D.heldout_set(tok, n_per_type=n_eval, seed=1234, split="test")
    train_probe = D.heldout_set(tok, n_per_type=max(1, n_eval // 2), seed=4321, split="train")
    model = make_model(size).to(dev)
    model.train()
    # Real LLaVAs start from a pretrained vision encoder; here a linear probe on the projector's output
    # (64 tokens -> the digit of each token's cell) gives the vision side that signal from step one.
    # The probe is dropped after training: the saved model is a plain LlavaForConditionalGeneration.
    probe = torch.nn.Linear(model.config.text_config.hidden_size, 10).to(dev)
    warm = min(WARMUP, max(1, steps // 10))
    task = _AnswerTask(model, probe, _batches(tok, bank, batch, steps, seed, dev.type == "cuda", palette), aux,
                       max(1, steps // 20), steps)
    t_train = time.time()
    fit(task, TrainConfig(steps=steps, lr=lr, warmup=warm, min_lr_ratio=0.05, betas=(0.9, 0.98), weight_decay=0.05,
                          max_grad_norm=1.0, batch_size=batch, seed=seed, cpu=dev.type == "cpu",
                          mixed_precision="bf16" if dev.type == "cuda" else "no"))
    curve = task.curve
    train_s = time.time() - t_train
    chance = majority_baseline(heldout)
    acc, metrics = save_and_score(model, tok, out, dev, evaluate, heldout, train_probe, D.QTYPES, chance, n_eval,
                                  "train-digit grids")
    wall = time.time() - t0
    out = Path(out)
    n_params, n_vision, n_text = (metrics[k] for k in ("parameters", "vision tower parameters", "language model parameters"))
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    metrics.update({"steps": steps, "batch": batch, "device": where, "training seconds": round(train_s, 1),
                    "seconds per step": round(train_s / steps, 4), "final train loss (language model)": curve[-1][1]})
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
               f"(β 0.9/0.98, wd 0.05 on matrices), {warm} warm-up steps, cosine to 5 %, grad clip 1, batch {batch}, "
               f"{steps} steps; loss on the answer token and `</s>`, plus {aux} × a per-patch digit loss through a training-only "
               "linear probe on the projector's output (each of the 64 vision tokens -> its cell's digit; standing in "
               "for the pretrained vision encoder a real LLaVA starts from; the probe is not saved)"
               f"{'; bf16 autocast' if dev.type == 'cuda' else ''}. Saved in fp16.",
               metrics, wall,
               extra="\nAccuracy is greedy (argmax) on the answer token. Majority-answer baseline = always giving "
               "the most frequent answer of that question type (chance level).\n\n"
               "## Training loss (step, language-model loss on answer + `</s>`; probe loss excluded)\n" + ", ".join(f"{s}: {v}" for s, v in curve) + "\n")
    card = out / "README.md"
    text = re.sub(r"^Training wall time: .*$", f"Training wall time: {wall / 60:.1f} min in all ({train_s / 60:.1f} min "
                  f"of training steps) on {where}.", card.read_text(), flags=re.M)
    kind = dev.type if dev.type in STEPS else "cpu"
    cmd = (f"mmskip zoo digits-llava{' --device cuda' if dev.type == 'cuda' else ''}"
           f"{'' if steps == STEPS[kind] else f' --steps {steps}'}{'' if batch == BATCH[kind] else f' --batch {batch}'}")
    text = re.sub(r"^Reproduce: .*$", f"Reproduce: `{cmd}` (fixed seeds; bf16 on a GPU, so not bit-exact).",
                  text, flags=re.M)
    card.write_text(text)
    print(f"held-out accuracy: {acc}  (majority baseline {chance})")
    return metrics
