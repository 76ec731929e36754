"""Train FiRST layer routers on a frozen LM (optionally with LoRA adapters), then measure the
quality vs layers-skipped curve.

    python -m mmskip.train.first --model stdlib-lm --out runs/stdlib-routers --steps 300 --sparsity 0.5
    python -m mmskip.train.first --model stdlib-lm --out runs/r --lora      # routers + LoRA (peft)

Training (FiRST, Jain et al., 2024) is :func:`mmskip.train.train` with two objectives:
:class:`~mmskip.train.RouterGates` (each routed layer's output gated softly by its router's mean
keep probability over the sequence, ``h + p * (layer(h) - h)``, plus ``sparsity`` x the mean keep
probability: latency) and :class:`~mmskip.train.Distillation` (KL from the unmodified model's
next-token distribution: quality). ``--straight-through`` makes the forward use the
hard decisions inference uses (gradients still flow through p). Only the routers (and LoRA
adapters, if asked) train. ``--sparsity`` is the training-time knob; ``RouterConfig.threshold`` the inference-time one.

Evaluation: each held-out window's first half is the prompt (the routers decide on it, with
hard decisions, exactly as ``RouterConfig`` does at prefill), the second half is scored through
the KV cache with that skip set: perplexity and top-1 agreement with the full model, per
threshold, beside the full model and beside a static schedule skipping as many layers (those
whose single skip changes the output least, measured on training windows).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mmskip.first_routers import RouterConfig, Routers
from mmskip.inject import applied

from .config import TrainConfig
from .data import FixedWindows
from .objectives import Distillation, RouterGates
from .trainer import train

__all__ = ["soft_gates", "train_routers", "evaluate_routers", "windows"]


@contextmanager
def soft_gates(model: torch.nn.Module, routers: Routers, straight_through: bool = False) -> Iterator[list]:
    """Gate every routed layer by its router's sequence keep probability (differentiable), as
    :class:`~mmskip.train.RouterGates` does in training. Yields the list that collects each
    layer's (batch,) keep probabilities during a forward."""
    gates = RouterGates(routers, straight_through=straight_through)
    gates.attach(model)
    try:
        yield gates.probabilities
    finally:
        gates.detach()


def windows(token_ids: torch.Tensor, seq_len: int, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` random windows of ``seq_len`` tokens from a 1-D token stream."""
    if len(token_ids) <= seq_len:
        raise ValueError(f"need more than {seq_len} tokens, got {len(token_ids)}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(token_ids) - seq_len, (n,), generator=g)
    return torch.stack([token_ids[s : s + seq_len] for s in starts.tolist()])


def train_routers(
    model: torch.nn.Module,
    routers: Routers,
    data: torch.Tensor,
    steps: int = 300,
    batch: int = 8,
    lr: float = 1e-3,
    sparsity: float = 0.5,
    lora: bool = False,
    log_every: int = 25,
    straight_through: bool = False,
    out: str | Path | None = None,
    resume: bool = False,
) -> tuple[torch.nn.Module, list[dict[str, float]]]:
    """Train ``routers`` (and LoRA adapters if ``lora``) on windows ``data`` (n, seq_len) with
    :func:`mmskip.train.train`; the LM's own weights stay frozen. Returns the model (the peft
    model, adapters not merged, when ``lora``) and the loss history (``kl``, mean ``keep``
    probability, ``loss``). ``out``/``resume``: the trainer's checkpoints."""
    if steps < 1 or batch < 1:
        raise ValueError("steps and batch must be >= 1")
    config = TrainConfig(steps=steps, batch_size=batch, seq_len=data.shape[1], lr=lr, min_lr_ratio=1.0,
                         max_grad_norm=0.0, trainable="lora" if lora else "none", merge_lora=False,
                         log_every=log_every)
    objectives = [RouterGates(routers, sparsity, straight_through), Distillation()]
    result = train(model, objectives, FixedWindows(data), config, out=out, resume=resume, progress=False)
    history = [{"step": h["step"] - 1, "kl": h["distill"], "keep": h["keep"], "loss": h["loss"]}
               for h in result.history if "loss" in h]
    return result.model, history


@torch.no_grad()
def evaluate_routers(
    model: torch.nn.Module,
    routers_path: str | Path,
    data: torch.Tensor,
    thresholds: list[float],
    static_order: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Quality vs layers skipped: per threshold, mean layers skipped, perplexity of the second half
    of each window and top-1 agreement with the full model there (first half = the prompt).
    ``static_order``: layers in the order a static (input-agnostic) schedule would skip them; for
    each threshold the same number of layers is also skipped statically, for comparison."""
    from mmskip.layer_skip import LayerSkipConfig
    from mmskip.schedules import explicit

    half = data.shape[1] // 2
    rows = []
    full = [_score(model, ids[None], half) for ids in data]
    rows.append(_summary("full model", None, full, full))
    for t in thresholds:
        with applied(model, RouterConfig(path=str(routers_path), threshold=t)) as handle:
            runs = [_score(model, ids[None], half) for ids in data]
            skipped = list(handle.state.decisions.log)
        row = _summary(f"routers t={t}", t, runs, full)
        row["skipped_layers"] = sum(len(s) for s in skipped) / max(len(skipped), 1)
        row["distinct_skip_sets"] = len({tuple(s) for s in skipped})
        rows.append(row)
        k = round(row["skipped_layers"])
        if static_order is not None and k > 0:
            cfg = LayerSkipConfig(schedule=explicit(skip=sorted(static_order[:k])), phase="all")
            with applied(model, cfg):
                runs = [_score(model, ids[None], half) for ids in data]
            static = _summary(f"static {k} layers", None, runs, full)
            static["skipped_layers"] = float(k)
            rows.append(static)
    return rows


def _score(model: torch.nn.Module, ids: torch.Tensor, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits for positions half..end-1 computed through the cache after a prefill of ``ids[:, :half]``."""
    out = model(input_ids=ids[:, :half], use_cache=True)
    cont = model(input_ids=ids[:, half:-1], cache=out.cache, use_cache=True)
    logits = torch.cat([out.logits[:, -1:], cont.logits], 1)[0]
    return logits, ids[0, half:]


def _summary(name: str, threshold: float | None, runs: list, full: list) -> dict[str, Any]:
    nll, agree, n = 0.0, 0.0, 0
    for (logits, target), (ref, _) in zip(runs, full):
        nll += float(F.cross_entropy(logits.float(), target, reduction="sum"))
        agree += float((logits.argmax(-1) == ref.argmax(-1)).sum())
        n += len(target)
    return {"name": name, "threshold": threshold, "perplexity": math.exp(nll / n), "agreement": agree / n,
            "skipped_layers": 0.0}


def _corpus(tokenizer: Any, split: str, text: str | None) -> torch.Tensor:
    if text is not None:
        texts = [Path(text).read_text(errors="replace")]
    else:
        from mmskip.zoo.stdlib_data import read_texts

        texts = read_texts(split)
    eos = tokenizer.eos_token or ""
    ids = tokenizer(eos.join(texts), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    return ids


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mmskip.train.first", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="stdlib-lm", help="zoo name or from_pretrained folder")
    ap.add_argument("--out", required=True, help="folder for the routers (routers.safetensors + routers.json), results.json and any LoRA")
    ap.add_argument("--text", help="train/eval text file (default for stdlib-lm: the stdlib train / held-out split)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--sparsity", type=float, default=0.5, help="weight of the mean keep probability in the loss")
    ap.add_argument("--width", type=int, default=64, help="router hidden width")
    ap.add_argument("--lora", action="store_true", help="also train LoRA adapters (peft); saved beside the routers")
    ap.add_argument("--straight-through", action="store_true",
                    help="train with hard keep/skip decisions in the forward (gradients through p)")
    ap.add_argument("--thresholds", type=float, nargs="*", default=[0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--eval-windows", type=int, default=24)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from mmskip.eval.lm import load_lm

    model, tokenizer = load_lm(args.model)
    train_ids = _corpus(tokenizer, "train", args.text)
    eval_ids = train_ids if args.text else _corpus(tokenizer, "test", None)
    data = windows(train_ids, args.seq_len, max(64, args.steps * args.batch // 4), seed=0)
    routers = Routers.for_model(model, width=args.width)
    t0 = time.time()
    trained, history = train_routers(model, routers, data, args.steps, args.batch, args.lr, args.sparsity, args.lora,
                                     straight_through=args.straight_through)
    seconds = time.time() - t0
    out = Path(args.out)
    routers.save(out, model=args.model, sparsity=args.sparsity, steps=args.steps, lora=args.lora)
    if args.lora:
        trained.save_pretrained(out / "lora")
        model = trained.merge_and_unload()
    from mmskip.analysis.depth import skip_effects

    eval_data = windows(eval_ids, args.seq_len, args.eval_windows, seed=1)
    kl = skip_effects(model, windows(train_ids, args.seq_len, 8, seed=2))["output_kl"]
    order = sorted(range(1, len(kl)), key=kl.__getitem__)  # static peer: least single-skip effect first
    curve = evaluate_routers(model, out, eval_data, args.thresholds, static_order=order)
    result = {"model": args.model, "args": vars(args), "train_seconds": seconds, "history": history, "curve": curve}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(f"trained {len(routers.routed)} routers in {seconds:.0f}s; final {history[-1]}")
    print(f"| {'config':<18} | {'layers skipped':>14} | {'perplexity':>10} | {'agreement':>9} | distinct skip sets |")
    print("|---|---:|---:|---:|---:|")
    for r in curve:
        print(f"| {r['name']:<18} | {r['skipped_layers']:14.2f} | {r['perplexity']:10.2f} | {r['agreement']:9.3f} | "
              f"{r.get('distinct_skip_sets', '-')} |")
    print(f"wrote routers and results.json to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
