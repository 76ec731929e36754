"""Recipe for ``digits-florence``: a tiny Florence-2 (``Florence2ForConditionalGeneration``: DaViT vision tower,
BART encoder-decoder) captioning and answering questions about strips of 2-3 digits
(:mod:`mmskip.zoo.florence_data`), trained from scratch with MuE's layer-wise loss
(:func:`mmskip.vision.mue.train.train_mue`), so every encoder and decoder layer is exitable.

``mmskip zoo digits-florence`` trains the shipped model on one CPU thread.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mmskip.zoo import florence_data as D
from mmskip.zoo.card import write_card
from mmskip.zoo.florence_model import MAX_NEW_TOKENS, make_model

__all__ = ["STEPS", "BATCH", "layer_accuracy", "train_florence"]

STEPS = 2200
BATCH = 64
LR = 2e-3
WARMUP = 150
AUX = 0.5  # weight of the per-token slot-digit loss through a training-only linear probe on the image tokens
ENCODER_MIX = 0.5  # weight of the mixed-depth encoder term of the layer-wise loss
COPIES = 4  # train digits: the originals + 3 augmented copies



@torch.no_grad()
def layer_accuracy(model, batch: D.Batch, chunk: int = 200) -> list[float]:
    """Teacher-forced next-token accuracy of each decoder layer's output through the LM head (the quality
    an exit after that layer would give), over every target token."""
    from transformers.models.bart.modeling_bart import shift_tokens_right

    cfg = model.config.text_config
    hits, total = None, 0
    for a in range(0, len(batch), chunk):
        b = batch.slice(a, a + chunk)
        dec_in = shift_tokens_right(b.labels, cfg.pad_token_id, cfg.decoder_start_token_id)
        out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, pixel_values=b.pixel_values,
                    decoder_input_ids=dec_in, use_cache=False, output_hidden_states=True)
        m = b.labels != -100
        h = torch.stack([((model.lm_head(x).argmax(-1) == b.labels) & m).sum() for x in out.decoder_hidden_states[1:]])
        hits = h if hits is None else hits + h
        total += int(m.sum())
    return [round(float(v) / total, 4) for v in hits]


def _batches(tok, bank, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        images, slots = D.make_strips(bank, batch, g)
        b = D.make_batch(tok, images, *D.sample_tasks(slots, g), slots)
        yield {**b.model_inputs(), "slots": b.slots}


def train_florence(out: Path, steps: int | None = None, batch: int | None = None, seed: int = 0,
                   size: str = "base", n_eval: int = 100, lr: float = LR, resume: bool = False,
                   progress: bool = True) -> dict:
    """Train ``digits-florence`` into ``out`` and write its model card; returns the metrics.

    ``steps``/``batch`` default to :data:`STEPS`/:data:`BATCH`. ``size="tiny"`` and a small ``n_eval``
    (held-out strips per task) are for tests. ``resume`` continues ``out/checkpoint/`` (removed when
    the run finishes)."""
    from mmskip.vision.mue.train import CHECKPOINT, train_mue

    steps = STEPS if steps is None else steps
    batch = BATCH if batch is None else batch
    torch.manual_seed(seed)
    t0 = time.time()
    tok = D.build_tokenizer()
    bank = D.digit_bank("train", copies=COPIES, seed=seed)
    heldout = D.heldout_set(tok, n_per_task=n_eval, seed=1234, split="test")
    model = make_model(size)
    # No pretrained vision tower here: a linear probe on the image tokens (each of the 12 grid tokens ->
    # its slot's digit or blank) gives the vision side a signal from step one; it is not saved.
    d = model.config.text_config.d_model
    probe = torch.nn.Linear(d, 11)
    captured: dict[str, torch.Tensor] = {}
    hook = model.model.multi_modal_projector.register_forward_hook(
        lambda mod, args, output: captured.__setitem__("feats", output))

    def aux_loss(b):
        feats = captured["feats"][:, 1:]  # the pooled token first, then the 2×6 grid
        return AUX * F.cross_entropy(probe(feats).flatten(0, 1), D.slot_labels(b["slots"]).flatten())

    out = Path(out)
    warm = min(WARMUP, max(1, steps // 10))
    try:
        rec = train_mue(model, _batches(tok, bank, batch, seed), steps=steps, out=out, lr=lr, warmup=warm,
                        encoder_mix=ENCODER_MIX, aux_loss=aux_loss if AUX else None, aux_module=probe, seed=seed,
                        resume=resume, checkpoint_every=max(1, min(200, steps)), save=False, progress=progress,
                        desc="digits-florence")
    finally:
        hook.remove()
    train_s = rec["train_seconds"]
    model.to(torch.float16).float().eval()  # evaluate the weights exactly as saved
    t_eval = time.time()
    preds = D.answers(model, tok, heldout, max_new_tokens=MAX_NEW_TOKENS)
    acc = D.score(preds, heldout)
    layers = layer_accuracy(model, heldout)
    eval_s = time.time() - t_eval
    chance = D.majority_baseline(heldout)
    wall = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    model.float()
    shutil.rmtree((out / CHECKPOINT).parent, ignore_errors=True)
    n_params = sum(p.numel() for p in model.parameters())
    n_vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    n_text = sum(p.numel() for p in model.model.language_model.parameters())
    where = f"CPU ({torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''})"
    n = len(heldout)
    metrics = {f"held-out exact match, all ({n} items)": acc["all"]}
    metrics.update({f"held-out exact match, {t} ({n_eval})": acc[t] for t in D.TASKS})
    metrics["held-out caption BLEU-4 (torchmetrics)"] = acc["bleu"] if acc["bleu"] is not None else "n/a"
    metrics.update({f"majority-answer baseline, {t}": chance[t] for t in D.TASKS})
    metrics.update({f"teacher-forced token accuracy, decoder layer {i + 1}": v for i, v in enumerate(layers)})
    metrics.update({"parameters": n_params, "vision tower parameters": n_vision,
                    "language model parameters (BART, tied LM head)": n_text, "steps": steps, "batch": batch,
                    "device": where, "training seconds": train_s, "seconds per step": round(train_s / steps, 4),
                    "evaluation seconds": round(eval_s, 1),
                    "final layer-wise loss": rec["loss_curve"][-1][1] if rec["loss_curve"] else None})
    vc, tc = model.config.vision_config, model.config.text_config
    curve = ", ".join(f"{s}: {v}" for s, v in rec["loss_curve"])
    per_layer = "; ".join(f"{s}: {' / '.join(str(x) for x in dl)}" + (f" (mixed-depth encoder {mx})" if mx else "")
                          for s, dl, mx in rec["layer_curve"])
    write_card(out, "digits-florence",
               "Tiny Florence-2 (`Florence2ForConditionalGeneration`: DaViT vision tower, BART encoder-decoder) that "
               "captions strips of 2-3 handwritten digits and answers questions about them, trained with MuE's "
               "layer-wise loss so every decoder layer's output is a usable prediction and intermediate encoder "
               "states are usable by the decoder (for MuE early-exit research, `mmskip.vision.MuEConfig`). "
               "`mmskip.zoo.load('digits-florence')` returns `(model, tokenizer)` (float32, eval); build inputs "
               "with `mmskip.zoo.florence_data.encode(tokenizer, images, prompts)` or ask with "
               "`florence_data.generate(model, tokenizer, images, prompts)`.",
               "Images: strips of three 8×8 slots (8×24 grey, 3 equal channels in [-1, 1]); half the strips hold "
               "3 scikit-learn digits, half 2 (one slot blank). Train strips use the zoo's train digits "
               f"(+ {COPIES - 1} lightly augmented copies), held-out strips only the 300 held-out digits "
               "(split of `mmskip.zoo.data`). Tasks (sampled 40/20/20/20 %): `describe the image` -> `a 7 next to "
               "a 3` / `a 7 next to a 3 and a 5`; `what is the sum ?` -> 0-27; `how many D are there ?` -> 0-3; "
               "`what is on the left|middle|right ?` -> the digit or `nothing`. Encoder input: 13 image tokens, "
               f"`<s>`, the prompt, `</s>`; the decoder generates the answer and `</s>`. Word-level tokenizer "
               f"({len(tok)} tokens). Generated from seeds (train stream seed {seed}, held-out seed 1234); "
               "nothing is shipped.",
               f"Vision: DaViT, 2 stages of 1 block (widths {tuple(vc.embed_dim)}, 3×3 stride-2 patch convs: "
               f"8×24 -> 2×6 tokens + 1 pooled = {D.N_IMAGE_TOKENS}), Florence-2 projector to d={tc.d_model}. "
               f"Text: BART, {tc.encoder_layers} encoder + {tc.decoder_layers} decoder layers, d={tc.d_model}, "
               f"{tc.encoder_attention_heads} heads, FFN {tc.encoder_ffn_dim}, post-LN, LM head tied to the "
               f"embeddings. {n_params / 1e6:.2f}M parameters (vision {n_vision / 1e6:.2f}M), all trained from "
               "scratch with `mmskip.vision.mue.train.train_mue`: loss = mean over decoder layers of the "
               "teacher-forced CE of that layer's output through the LM head + "
               f"{ENCODER_MIX} × the same with the decoder re-run on a mixed-depth encoder memory (each token's "
               f"state from a random encoder layer) + {AUX} × a per-token slot-digit CE through a training-only "
               "linear probe on the 12 grid image tokens (standing in for a pretrained vision tower; not saved). "
               f"AdamW lr {lr} (β 0.9/0.98, wd 0.05 on matrices), {warm} warm-up steps, cosine to 5 %, grad clip 1, "
               f"batch {batch}, {steps} steps. Saved in fp16 (evaluated after the fp16 round trip).",
               metrics, wall,
               extra="\nExact match: greedy generation (up to 12 new tokens) equals the target string. BLEU-4: "
               "torchmetrics `BLEUScore` over the held-out captions (one reference each). Majority-answer "
               "baseline: always giving the most frequent target of that task. Teacher-forced token accuracy "
               "per decoder layer: the layer's output through the LM head, on every target token (what an exit "
               "after that layer would predict).\n\n"
               "## Training loss (step, layer-wise loss: mean decoder-layer CE + mixed-depth term; probe excluded)\n"
               + curve + "\n\n## Per-decoder-layer CE during training (step: layer 1 / ... / last)\n" + per_layer + "\n")
    card = out / "README.md"
    text = re.sub(r"^Training wall time: .*$", f"Training wall time: {wall / 60:.1f} min in all ({train_s / 60:.1f} min "
                  f"of training steps) on {where} of a shared 2-core Xeon (another job running).",
                  card.read_text(), flags=re.M)
    cmd = (f"mmskip zoo digits-florence{'' if steps == STEPS else f' --steps {steps}'}"
           f"{'' if batch == BATCH else f' --batch {batch}'}")
    text = re.sub(r"^Reproduce: .*$", f"Reproduce: `{cmd}` (fixed seeds; 1 CPU thread).", text, flags=re.M)
    card.write_text(text)
    print(f"held-out: {acc}  (majority baseline {chance}); decoder layers {layers}")
    return metrics
