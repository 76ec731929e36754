"""Recipe for ``stdlib-lm``: a deep, narrow Llama trained on Python's standard library source."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from mmskip.train import TrainConfig, fit
from mmskip.zoo.card import write_card
from mmskip.zoo.lm_model import SEQ, make_model, perplexity, train_tokenizer
from mmskip.zoo.loaders import LOADERS
from mmskip.zoo.stdlib_data import read_texts

from ._fit import RecipeTask

__all__ = ["train_stdlib_lm", "skip_agreement"]

BATCH = 12
# (steps, peak lr) per stage; more stages = warm restarts. 12,000 steps x 12 x 256 tokens = 36.9M tokens,
# about 11 epochs of the 3.25M-token train split (the first shipped model saw 800 steps, 0.76 epochs).
STAGES: tuple[tuple[int, float], ...] = ((12_000, 3e-3),)
LR = 3e-3
WARMUP = 200
SAVE_EVERY = 50  # a stopped run (``mmskip zoo stdlib-lm`` again) resumes from the last of these


def _stream(tokenizer, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.int64)


class _NextToken(RecipeTask):
    """Next-token loss on random ``SEQ``-token windows of the train stream."""

    def __init__(self, model, train_ids: torch.Tensor, seed: int, desc: str) -> None:
        super().__init__({"model": model}, seed, desc)
        self.model, self.train_ids = model, train_ids

    def draw(self, g: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, len(self.train_ids) - SEQ - 1, (BATCH,), generator=g)
        return torch.stack([self.train_ids[s:s + SEQ] for s in starts])

    def loss(self, x: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        x = x.to(self.device)
        return {"lm": self.model(input_ids=x, labels=x).loss}


def _train_stage(model, train_ids: torch.Tensor, steps: int, lr: float, seed: int, desc: str,
                 ckpt: Path | None = None) -> float:
    """One :func:`mmskip.train.fit`: AdamW (fresh state, β 0.9/0.95, wd 0.1) with ``WARMUP`` warm-up steps
    and a cosine decay to 10 % over ``steps``, grad clip 1. With ``ckpt`` the stage checkpoints there
    every ``SAVE_EVERY`` steps and continues a checkpoint it finds (same batches, same optimizer).
    Returns the stage's training seconds, over all the runs that made it."""
    return fit(_NextToken(model, train_ids, seed, desc),
        TrainConfig(steps=steps, lr=lr, warmup=min(WARMUP, steps // 4), min_lr_ratio=0.1, betas=(0.9, 0.95),
                    weight_decay=0.1, max_grad_norm=1.0, batch_size=BATCH, seq_len=SEQ, seed=seed, cpu=True,
                    save_every=SAVE_EVERY if ckpt is not None else 0),
        out=ckpt, resume=ckpt is not None).seconds


def train_stdlib_lm(out: Path, steps: int | None = None, seed: int = 0, start_stage: int = 0) -> dict:
    """Train in ``STAGES`` (warm restarts: fresh AdamW + cosine each, weights rounded to fp16 between
    stages exactly as when a stage's checkpoint is saved). ``start_stage=k`` resumes from the fp16
    checkpoint in ``out`` written after stage ``k - 1``. ``steps`` (smoke tests) runs one stage."""
    torch.manual_seed(seed)
    t0 = time.time()
    train_texts, test_texts = read_texts("train"), read_texts("test")
    stages = ((steps, LR),) if steps is not None else STAGES
    prev_wall, train_s = 0.0, 0.0
    if start_stage == 0:
        progress = Path(out) / "training"  # checkpoints and the tokenizer of a run in progress
        if (progress / "tokenizer.json").exists():
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast.from_pretrained(progress)
        else:
            tok = train_tokenizer(train_texts)
            tok.save_pretrained(progress)
        model = make_model(len(tok))
    else:
        model, tok = LOADERS["stdlib-lm"](Path(out))
        prev_wall = json.loads((Path(out) / "metrics.json").read_text())["wall_time_s"]
    train_ids, test_ids = _stream(tok, train_texts), _stream(tok, test_texts)
    for k in range(start_stage, len(stages)):
        n, lr = stages[k]
        ckpt = Path(out) / "training" / f"stage{k + 1}" if steps is None else None
        train_s += _train_stage(model, train_ids, n, lr, seed + k, f"stdlib-lm stage {k + 1}/{len(stages)}", ckpt)
        model.to(torch.float16).float()
    steps = sum(n for n, _ in stages)
    wall = prev_wall + max(time.time() - t0, train_s)  # a resumed stage counts the runs before this one
    ppl = perplexity(model, test_ids)
    train_ppl = perplexity(model, train_ids[: len(test_ids)])
    prompt = "def read_file(path):"  # no trailing newline: newline + indent is one token in this tokenizer
    ids = tok(prompt, return_tensors="pt").input_ids
    sample = tok.decode(model.generate(ids, max_new_tokens=80, do_sample=False)[0])
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    model.generation_config.save_pretrained(out)
    tok.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    metrics = {"held-out perplexity (stdlib modules)": ppl, "train-sample perplexity": train_ppl,
               "held-out tokens": len(test_ids), "train tokens": len(train_ids), "parameters": n_params}
    c = model.config
    write_card(out, "stdlib-lm", "Deep, narrow Llama-architecture causal LM (for layer-skipping research) trained on "
               "Python's own standard library source.",
               f"Every `*.py` under this Python's stdlib (excluding site-packages and test suites); files whose "
               f"path CRC32 % 20 == 0 are held out ({len(test_texts)} files, {len(test_ids)} tokens). "
               f"Byte-level BPE tokenizer ({len(tok)} tokens) trained with `tokenizers` on the train files.",
               f"`LlamaForCausalLM`, {c.num_hidden_layers} layers, d={c.hidden_size}, {c.num_attention_heads} heads, "
               f"SwiGLU {c.intermediate_size}, tied embeddings, {n_params / 1e6:.2f}M parameters. Stages (steps, peak lr): "
               f"{list(stages)}; each a fresh AdamW (β 0.9/0.95, wd 0.1) with 50 warm-up steps and cosine decay to "
               f"10 % (warm restarts); batch {BATCH}×{SEQ} tokens, {steps} steps in all, grad clip 1. Saved in fp16.",
               metrics, wall, extra=f"\n## Greedy sample\n```python\n{sample}\n```\n")
    skip_agreement(out)
    return metrics


def skip_agreement(folder: Path, skip_counts: tuple[int, ...] = (1, 2, 4, 6), speedups: tuple[float, ...] = (2.0,),
                   n_prompts: int = 24, max_new_tokens: int = 32) -> list[dict]:
    """Append to the model card how often layer-skipped drafts agree with the full model's greedy output.

    Skip sets: the ``k`` layers just below the last one (``explicit``), and Unified Layer Skipping's
    ``unified(speedup)``; ``LayerSkipConfig(phase="all")``. Prompts: 64-token held-out windows.
    """
    import mmskip
    from mmskip.eval.language import agreement, greedy_generate
    from mmskip.eval.lm import heldout_ids

    model, tok = LOADERS["stdlib-lm"](Path(folder))
    ids = heldout_ids(tok)
    stride = (len(ids) - 64) // n_prompts
    prompts = [ids[i:i + 64] for i in range(0, len(ids) - 64, stride)][:n_prompts]
    base = greedy_generate(model, prompts, max_new_tokens)
    n_layers = model.config.num_hidden_layers
    scheds = [(f"explicit {k}", mmskip.schedules.explicit(skip=list(range(n_layers - 1 - k, n_layers - 1))))
              for k in skip_counts]
    scheds += [(f"unified({s})", mmskip.schedules.unified(speedup=s)) for s in speedups]
    rows = []
    for name, sched in scheds:
        with mmskip.applied(model, mmskip.LayerSkipConfig(schedule=sched, phase="all")) as handle:
            r = agreement(model, prompts, base)
            r["skipped_layers"] = handle.stats().get("skipped_layers")
        rows.append({"schedule": name, **r})
    lines = ["", "## Layer-skipped drafts vs the full model (greedy, held-out prompts)",
             f"{len(prompts)} prompts × {max_new_tokens} new tokens; `LayerSkipConfig(schedule, phase='all')`. "
             "token agreement is teacher-forced on the full model's continuation.", "",
             "| schedule | skipped layers | token agreement | exact match | prefix match |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['schedule']} | {r['skipped_layers']} | {r['token_agreement']:.3f} | "
                     f"{r['exact_match']:.3f} | {r['prefix_match']:.3f} |")
    card = Path(folder) / "README.md"
    card.write_text(card.read_text() + "\n".join(lines) + "\n")
    return rows
