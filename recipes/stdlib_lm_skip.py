"""Recipe for ``stdlib-lm-skip``: a deep, narrow Llama trained with LayerSkip's layer dropout and
early-exit loss on the same data and tokenizer as ``stdlib-lm``.

    mmskip zoo stdlib-lm-skip --threads 2   # CPU (about 95 min)
    mmskip zoo stdlib-lm-skip --device cuda

The first version matched ``stdlib-lm``'s compute (800 steps of 12 x 256 tokens through 4.72M
weights): each step here costs the layers plus the LM head once per early exit the curriculum
enables, and :func:`matched_steps` gives the step count with the same total multiply-adds. Matched
to the retrained ``stdlib-lm`` (12,000 steps) that is 21,880 steps, 5.6 h on two CPU threads; the
shipped model trains :data:`CPU_STEPS` steps (18.4M tokens, 5.7 epochs), which fit one session.

An optional second stage (``schedule_aware_steps``, :data:`SCHEDULE_AWARE`; off by default)
fine-tunes all weights with Unified Layer Skipping's s=1.5 schedule applied while the LayerSkip
objectives stay on: agreement at s=1.5 rises from 0.81 to 0.88, but the model's continuations
copy their context less, so prompt-lookup speculation on it fell from 1.18x to 0.92x. The shipped
model is stage 1 only; ``docs/training.md`` has the comparison.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

import mmskip
from mmskip.train import (
    EarlyExitLoss,
    LanguageModeling,
    LayerDropout,
    ScheduleAware,
    TrainConfig,
    token_stream,
    train,
)
from mmskip.zoo.card import write_card as write_model_card
from mmskip.zoo.lm_model import make_model, perplexity

from .stdlib_lm import skip_agreement

__all__ = ["train_stdlib_lm_skip", "matched_steps", "RECIPE"]

# chosen by a sweep of 9 variants on a GPU (README "Skip-aware training"), every one compute-matched
RECIPE: dict[str, Any] = {"layers": 24, "d": 64, "p_max": 0.2, "e_scale": 1.0, "rotation": 8,
                          "dropout_curriculum": "exponential", "schedule_aware_steps": 0}
REF_STEPS, REF_MACS = 800, 4.72e6  # the first stdlib-lm: steps, weight multiply-adds per token (layers + head)
LONG_STEPS = 12_000  # stdlib-lm's recipe now (recipes/stdlib_lm.py STAGES): steps are matched to this
CPU_STEPS = 6_000  # the default run: what two CPU threads train in about 100 min (0.93 s a step)
BATCH, SEQ, LR = 12, 256, 3e-3
# stage 2: the layer-skip schedule inference uses, applied in training (Liu et al. 2024's fine-tune)
SCHEDULE_AWARE: dict[str, Any] = {"speedup": 1.5, "steps": 300, "batch": 8, "lr": 3e-4, "warmup": 20}


def matched_steps(layers: int, d: int, vocab: int, rotation: int | None, ref_steps: int = REF_STEPS) -> int:
    """Steps whose multiply-adds equal ``ref_steps`` of ``stdlib-lm``: per token, ``layers`` Llama layers
    (4 d^2 attention + 12 d^2 SwiGLU) and the head once plus once per enabled early exit
    (about ``(layers - 1) / rotation`` of them)."""
    exits = 0.0 if rotation is None else (layers - 1) / rotation
    macs = layers * 16 * d * d + vocab * d * (1 + exits)
    return round(ref_steps * REF_MACS / macs)


def train_stdlib_lm_skip(out: Path, steps: int | None = None, seed: int = 0, device: str | None = None,
                         texts: tuple[list[str], list[str]] | None = None, write_card: bool = True,
                         init: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """Train ``stdlib-lm-skip`` into ``out`` (a ``from_pretrained`` folder, fp16) and return its metrics.

    ``overrides`` change :data:`RECIPE` entries (``layers``, ``d``, ``p_max``, ``e_scale``,
    ``rotation`` (``None``: no early-exit loss), ``dropout_curriculum``; ``p_max=0``: no dropout).
    ``texts``: (train, test) source texts (default: this Python's stdlib split, as for ``stdlib-lm``).
    ``init``: a folder holding stage 1's saved (fp16) weights and ``train_info.json``; stage 1 is
    then not run, and stage 2 (:data:`SCHEDULE_AWARE`, turned on by ``schedule_aware_steps=300``)
    starts from those weights, exactly as it does after stage 1 (which is rounded to fp16 first).
    """
    from transformers import AutoTokenizer

    from mmskip.zoo import path as zoo_path
    from mmskip.zoo.stdlib_data import read_texts

    unknown = set(overrides) - set(RECIPE)
    if unknown:
        raise ValueError(f"unknown recipe settings {sorted(unknown)}; known: {sorted(RECIPE)}")
    r = {**RECIPE, **overrides}
    torch.manual_seed(seed)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(zoo_path("stdlib-lm"))  # the same tokenizer: perplexities compare
    train_texts, test_texts = texts if texts is not None else (read_texts("train"), read_texts("test"))
    train_ids, test_ids = token_stream(tok, train_texts), token_stream(tok, test_texts)
    n_steps = steps if steps is not None else CPU_STEPS
    objectives = _layerskip_objectives(r, seed)
    cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    if init is None:
        model = make_model(len(tok), layers=r["layers"], d=r["d"])
        cfg = TrainConfig(steps=n_steps, batch_size=BATCH, seq_len=SEQ, lr=LR, warmup=50, weight_decay=0.1,
                          seed=seed, cpu=cpu, log_every=50, save_every=50 if steps is None else 0)
        # a full run checkpoints under OUT/training and continues a stopped one when started again
        result = train(model, objectives, train_ids, cfg, out=Path(out) / "training" if steps is None else None,
                       resume=steps is None)
        model = result.model.to("cpu").to(torch.float16).float()  # stage 2 starts from what stage 1 would save
        stage1 = {"config": cfg.to_dict(), "history": result.history, "wall_time_s": time.time() - t0}
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(init).float()
        stage1 = {k: v for k, v in json.loads((Path(init) / "train_info.json").read_text()).items()
                  if k in ("config", "history", "wall_time_s")}
    sa_steps = r["schedule_aware_steps"]
    stage1_ppl = perplexity(model.eval(), test_ids) if sa_steps else None
    stage2: dict[str, Any] = {}
    if sa_steps:
        t1 = time.time()
        sa = SCHEDULE_AWARE
        objectives = [ScheduleAware(mmskip.LayerSkipConfig(schedule=mmskip.schedules.unified(sa["speedup"]))),
                      *_layerskip_objectives(r, seed)]
        cfg2 = TrainConfig(steps=sa_steps, batch_size=sa["batch"], seq_len=SEQ, lr=sa["lr"], warmup=sa["warmup"],
                           weight_decay=0.0, seed=seed, cpu=cpu, log_every=10)
        res2 = train(model.train(), objectives, train_ids, cfg2)
        model = res2.model
        stage2 = {"config": cfg2.to_dict(), "history": res2.history, "wall_time_s": time.time() - t1}
    wall = stage1.get("wall_time_s", 0.0) + stage2.get("wall_time_s", 0.0)
    model = model.to("cpu").float().eval()
    model.to(torch.float16).float()  # measure what is saved
    metrics = {"held-out perplexity (stdlib modules)": perplexity(model, test_ids),
               "train-sample perplexity": perplexity(model, train_ids[: len(test_ids)]),
               "held-out tokens": len(test_ids), "train tokens": len(train_ids),
               "parameters": sum(p.numel() for p in model.parameters()), "steps": n_steps}
    if sa_steps:
        metrics.update({"held-out perplexity after stage 1 (before the schedule-aware stage)": stage1_ppl,
                        "schedule-aware steps": sa_steps})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    model.generation_config.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "train_info.json").write_text(json.dumps({"recipe": r, "objectives": [repr(o) for o in objectives],
                                                     **stage1, "stage2": stage2, "device": _device_name(cpu),
                                                     "wall_time_s": wall}, indent=1) + "\n")
    if write_card:
        _card(out, r, objectives, n_steps, metrics, wall)
    return metrics


def _layerskip_objectives(r: dict[str, Any], seed: int) -> list:
    """Stage 1's objectives (kept on in stage 2): LayerSkip's layer dropout and early-exit loss."""
    objectives: list = []
    if r["p_max"] > 0:
        objectives.append(LayerDropout(r["p_max"], curriculum=r["dropout_curriculum"], seed=seed))
    if r["rotation"] is not None:
        objectives.append(EarlyExitLoss(e_scale=r["e_scale"], curriculum="rotational", rotation=r["rotation"]))
    else:
        objectives.append(LanguageModeling())
    return objectives


def _device_name(cpu: bool) -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() and not cpu else "cpu"


def _card(out: Path, r: dict[str, Any], objectives: list, steps: int, metrics: dict[str, Any], wall: float) -> None:
    sa = SCHEDULE_AWARE
    stage2 = (f" Stage 2, schedule-aware: {r['schedule_aware_steps']} steps with {', '.join(map(repr, objectives))} "
              f"(Unified Layer Skipping's s={sa['speedup']} schedule applied in every training forward, the "
              f"LayerSkip objectives kept), AdamW lr {sa['lr']} (no weight decay, {sa['warmup']} warm-up steps, "
              f"cosine to 10 %), batch {sa['batch']}×{SEQ}, from stage 1's fp16 weights."
              if r["schedule_aware_steps"] else "")
    write_model_card(out, "stdlib-lm-skip",
               "Deep, narrow Llama trained to survive layer skipping (LayerSkip's layer dropout and early-exit "
               f"loss{', then a schedule-aware stage' if r['schedule_aware_steps'] else ''}) on Python's own "
               "standard library source; the skip-aware sibling of `stdlib-lm`.",
               "The same split and tokenizer as `stdlib-lm` (its byte-level BPE, 4096 tokens).",
               f"`LlamaForCausalLM`, {r['layers']} layers, d={r['d']}, SwiGLU {4 * r['d']}, tied embeddings, "
               f"{metrics['parameters'] / 1e6:.2f}M parameters. Stage 1: "
               f"{', '.join(map(repr, _layerskip_objectives(r, 0)))}; "
               f"AdamW lr {LR} (β 0.9/0.95, wd 0.1, 50 warm-up steps, cosine to 10 %), batch {BATCH}×{SEQ} tokens, "
               f"{steps} steps ({steps * BATCH * SEQ / 1e6:.1f}M tokens; the multiply-adds of `stdlib-lm`'s {LONG_STEPS} "
               f"would take {matched_steps(r['layers'], r['d'], 4096, r['rotation'], LONG_STEPS)}, see `matched_steps`)."
               f"{stage2} Saved in fp16.",
               metrics, wall, **_where())
    skip_agreement(out, speedups=(1.5, 2.0))


def _where() -> dict[str, str]:
    """The card's hardware line and reproduce arguments, for a CPU run on more than one thread."""
    n = torch.get_num_threads()
    if torch.cuda.is_available() or n == 1:
        return {}
    return {"hardware": f"{n} threads of a 2-core Xeon CPU (no GPU)", "reproduce": f" --threads {n}"}
