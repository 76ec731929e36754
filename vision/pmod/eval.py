"""Held-out evaluation and data for ``python -m mmskip.vision.pmod.train`` on the zoo's
``digits-llava``: accuracy and prefill FLOPs of the unmodified model, trained routers and the
training-free signals at one schedule; the schedule parser and training batches the CLI uses."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmskip.inject import SkipConfig, apply

__all__ = ["evaluate_configs", "results_table", "steep", "parse_schedule", "load_model", "digit_batches", "heldout"]


# -- evaluation on digits-llava ------------------------------------------------------------------


@torch.no_grad()
def evaluate_configs(
    model: nn.Module,
    tokenizer: Any,
    data: Any,
    configs: Sequence[tuple[str, SkipConfig | None, nn.Module | None]],
    batch: int = 50,
) -> list[dict[str, Any]]:
    """Held-out accuracy of ``digits-llava``-style one-token answers under each config.

    ``data`` is a :class:`mmskip.zoo.llava_data.Batch`; each config is ``(name, config or None for the
    unmodified model, model to use instead of ``model`` or None)``. Prompts are left-padded and the
    answer is the argmax of the prefill's last logits (the first generated token). Per row: accuracy
    per question type and ``all``, agreement with the first config, and the token-weighted mean of
    ``handle.stats()``'s ``prefill_flops_fraction`` and ``kv_fraction`` over the prefills."""
    from mmskip.zoo import llava_data as D

    vocab = tokenizer.get_vocab()
    target = [vocab[a] for a in data.answers]
    rows, first = [], None
    for name, cfg, other in configs:
        m = other if other is not None else model
        dev = next(m.parameters()).device
        handle = apply(m, cfg) if cfg is not None else None
        preds, flops, kv, tokens = [], 0.0, 0.0, 0
        try:
            for s in range(0, len(data.questions), batch):
                enc = tokenizer([D.prompt_text(q) for q in data.questions[s:s + batch]], padding=True,
                                return_tensors="pt")
                inp = {"input_ids": enc["input_ids"].to(dev), "attention_mask": enc["attention_mask"].to(dev),
                       "pixel_values": data.pixel_values[s:s + batch].to(dev, next(m.parameters()).dtype)}
                logits = m(**inp, logits_to_keep=1, use_cache=False).logits[:, -1]
                preds += logits.argmax(-1).tolist()
                n = inp["input_ids"].numel()
                tokens += n
                st = handle.stats() if handle is not None else {}
                flops += st.get("prefill_flops_fraction", 1.0) * n
                kv += st.get("kv_fraction", 1.0) * n
        finally:
            if handle is not None:
                handle.remove()
        right = [p == t for p, t in zip(preds, target, strict=True)]
        row: dict[str, Any] = {"config": name, "signal": getattr(cfg, "signal", "-") if cfg is not None else "-"}
        for t in D.QTYPES:
            sel = [r for r, q in zip(right, data.qtypes, strict=True) if q == t]
            if sel:
                row[f"acc_{t}"] = sum(sel) / len(sel)
        row["acc_all"] = sum(right) / len(right)
        row["acc_all_se"] = math.sqrt(row["acc_all"] * (1 - row["acc_all"]) / len(right))
        row["prefill_flops_fraction"] = flops / tokens
        row["kv_fraction"] = kv / tokens
        first = preds if first is None else first
        row["agree_first"] = sum(a == b for a, b in zip(preds, first, strict=True)) / len(preds)
        rows.append(row)
    return rows


def results_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| config | signal | prefill FLOPs | KV | acc digit / count / sum / all | agree w/ unmodified |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['signal']} | {r['prefill_flops_fraction']:.3f} | {r['kv_fraction']:.3f} | "
                     f"{r.get('acc_digit', 0):.3f} / {r.get('acc_count', 0):.3f} / {r.get('acc_sum', 0):.3f} / "
                     f"{r['acc_all']:.3f} | {r['agree_first']:.3f} |")
    return "\n".join(lines)


def steep(num_layers: int) -> tuple[float, ...]:
    """A harsher schedule than PRD (``benchmarks/vision_tokens.py``'s "steep"): layer 0 full, then 0.35
    decaying by 0.75 per layer, floored at 0.1."""
    return (1.0,) + tuple(max(0.1, 0.35 * 0.75 ** (i - 1)) for i in range(1, num_layers))


def parse_schedule(text: str, num_layers: int) -> Any:
    """``progressive`` (p-MoD's PRD), ``steep`` or comma-separated keep ratios, one per decoder layer."""
    from mmskip import schedules

    if text == "progressive":
        return schedules.progressive()
    if text == "steep":
        return schedules.explicit(ratios=steep(num_layers))
    try:
        ratios = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"unknown schedule {text!r}; use progressive, steep or {num_layers} comma-separated "
                         "keep ratios (e.g. 1,1,0.8,0.6,...)") from None
    if len(ratios) != num_layers:
        raise ValueError(f"--schedule gives {len(ratios)} ratios, the model has {num_layers} decoder layers")
    return schedules.explicit(ratios=ratios)


def load_model(name: str) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a zoo name (``digits-llava``) or a ``from_pretrained`` folder of a
    model made by the digits-llava recipe; ``ValueError`` / ``FileNotFoundError`` saying what is wrong."""
    from mmskip import zoo
    from mmskip.zoo import llava_data as D
    from mmskip.zoo.loaders import load_llava

    if Path(name).is_dir():
        try:
            model, tok = load_llava(Path(name))
        except (OSError, ValueError) as e:
            raise ValueError(f"{name} is not a from_pretrained folder of a LLaVA model and its tokenizer ({e})") from None
    else:
        zoo.path(name)  # UnknownModelError (ValueError) / FileNotFoundError with what to do
        if name != "digits-llava":
            raise ValueError(f"zoo model {name!r} is not a vision-language model; routers train on digits-llava "
                             "(or a folder with a model trained by its recipe)")
        model, tok = zoo.load(name)
    if tok.convert_tokens_to_ids(D.IMAGE_TOKEN) != getattr(model.config, "image_token_id", None):
        raise ValueError(f"{name}: its tokenizer's {D.IMAGE_TOKEN} is not the model's image token; this trainer "
                         "uses digits-llava's data and needs a model made by its recipe")
    return model.eval(), tok


def digit_batches(tokenizer: Any, batch: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless training batches of the digits-llava recipe's data (train digits + augmented copies,
    1-10 class palettes, question mix 50/25/25 %), teacher-forced with labels on the answer and ``</s>``."""
    from mmskip.zoo import llava_data as D
    from mmskip.zoo.llava_data import COPIES, PALETTE

    bank = D.digit_bank("train", copies=COPIES, seed=seed)
    g = torch.Generator().manual_seed(seed)
    while True:
        images, labels = D.make_grids(bank, batch, g, palette=PALETTE)
        b = D.make_batch(tokenizer, images, *D.sample_questions(labels, g))
        yield {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "pixel_values": b.pixel_values,
               "labels": b.labels}


def heldout(tokenizer: Any, n_per_type: int) -> Any:
    """The first ``n_per_type`` questions of each type of the recipe's held-out set (seed 1234, held-out
    digits; the same questions ``benchmarks/vision_tokens.py`` uses)."""
    from mmskip.zoo import llava_data as D

    full = D.heldout_set(tokenizer, max(n_per_type, 500))
    pick = [i for t in D.QTYPES for i in [j for j, q in enumerate(full.qtypes) if q == t][:n_per_type]]
    return D.Batch(full.pixel_values[pick], full.input_ids[pick], full.attention_mask[pick], full.labels[pick],
                   full.answer_pos[pick], [full.qtypes[i] for i in pick], [full.questions[i] for i in pick],
                   [full.answers[i] for i in pick])
