"""Held-out evaluation and data for ``python -m mmskip.vision.pmod.train`` on the zoo's
``digits-llava`` (p-MoD, images) or ``digits-video`` (VideoLLM-MoD): accuracy and prefill FLOPs of
the unmodified model, trained routers and the training-free signals at one schedule; the schedule
parser and training batches the CLI uses."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmskip.inject import SkipConfig, apply

__all__ = ["evaluate_configs", "results_table", "steep", "parse_schedule", "load_model", "takes_video", "digit_batches",
           "video_batches", "heldout"]


# -- evaluation on digits-llava / digits-video ---------------------------------------------------


@torch.no_grad()
def evaluate_configs(
    model: nn.Module,
    tokenizer: Any,
    data: Any,
    configs: Sequence[tuple[str, SkipConfig | None, nn.Module | None]],
    batch: int = 50,
) -> list[dict[str, Any]]:
    """Held-out accuracy of ``digits-llava``- or ``digits-video``-style one-token answers under each config.

    ``data`` is a :class:`mmskip.zoo.llava_data.Batch` or :class:`mmskip.zoo.video_data.Batch`; each config
    is ``(name, config or None for the unmodified model, model to use instead of ``model`` or None)``.
    Prompts are left-padded (videos batched by clip count) and the answer is the argmax of the
    prefill's last logits (the first generated token). Per row: accuracy per question type and
    ``all``, agreement with the first config, and the token-weighted mean of ``handle.stats()``'s
    ``prefill_flops_fraction`` and ``kv_fraction`` over the prefills."""
    D = _data_module(data)
    vocab = tokenizer.get_vocab()
    target = [vocab[a] for a in data.answers]
    rows, first = [], None
    for name, cfg, other in configs:
        m = other if other is not None else model
        param = next(m.parameters())
        handle = apply(m, cfg) if cfg is not None else None
        preds, flops, kv, tokens = [0] * len(target), 0.0, 0.0, 0
        try:
            for idx, inp in _prompt_batches(tokenizer, data, batch):
                inp = {k: v.to(param.device, param.dtype if v.is_floating_point() else v.dtype) for k, v in inp.items()}
                logits = m(**inp, logits_to_keep=1, use_cache=False).logits[:, -1]
                for i, pred in zip(idx, logits.argmax(-1).tolist(), strict=True):
                    preds[i] = pred
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


def _data_module(data: Any) -> Any:
    """The zoo data module ``data`` (a held-out ``Batch``) comes from: ``video_data`` or ``llava_data``."""
    from mmskip.zoo import llava_data, video_data

    return video_data if isinstance(data, video_data.Batch) else llava_data


def _prompt_batches(tokenizer: Any, data: Any, batch: int) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """``(rows, left-padded prefill inputs)`` per batch of ``data``'s questions; videos are batched by clip
    count (packed MoD rows of one batch must have the same vision tokens)."""
    from mmskip.zoo import llava_data, video_data

    n = len(data.questions)
    if isinstance(data, video_data.Batch):
        clips = data.videos.clips()
        for c in sorted({int(k) for k in data.videos.n_clips}):
            rows = [i for i in range(n) if int(data.videos.n_clips[i]) == c]
            for s in range(0, len(rows), batch):
                idx = rows[s:s + batch]
                yield idx, video_data.encode(tokenizer, [clips[i] for i in idx], [data.questions[i] for i in idx])
        return
    for s in range(0, n, batch):
        enc = tokenizer([llava_data.prompt_text(q) for q in data.questions[s:s + batch]], padding=True,
                        return_tensors="pt")
        yield list(range(s, min(n, s + batch))), {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                                                  "pixel_values": data.pixel_values[s:s + batch]}


def results_table(rows: list[dict[str, Any]], qtypes: Sequence[str] = ("digit", "count", "sum")) -> str:
    lines = [f"| config | signal | prefill FLOPs | KV | acc {' / '.join(qtypes)} / all | agree w/ unmodified |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        accs = " / ".join(f"{r.get(f'acc_{t}', 0):.3f}" for t in qtypes)
        lines.append(f"| {r['config']} | {r['signal']} | {r['prefill_flops_fraction']:.3f} | {r['kv_fraction']:.3f} | "
                     f"{accs} / {r['acc_all']:.3f} | {r['agree_first']:.3f} |")
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
    """``(model, tokenizer)`` from a zoo name (``digits-llava``, ``digits-video``) or a ``from_pretrained``
    folder of a model made by either recipe; ``ValueError`` / ``FileNotFoundError`` saying what is wrong."""
    from mmskip import zoo
    from mmskip.zoo import llava_data, video_data
    from mmskip.zoo.loaders import load_llava, load_video

    if Path(name).is_dir():
        from transformers import AutoConfig

        try:
            video = AutoConfig.from_pretrained(name).model_type == "llava_onevision"
            model, tok = (load_video if video else load_llava)(Path(name))
        except (OSError, ValueError) as e:
            raise ValueError(f"{name} is not a from_pretrained folder of a LLaVA / LLaVA-OneVision model and its "
                             f"tokenizer ({e})") from None
    else:
        zoo.path(name)  # UnknownModelError (ValueError) / FileNotFoundError with what to do
        if name not in ("digits-llava", "digits-video"):
            raise ValueError(f"zoo model {name!r} is not a vision-language model; routers train on digits-llava or "
                             "digits-video (or a folder with a model trained by their recipes)")
        model, tok = zoo.load(name)
    token, field = ((video_data.VIDEO_TOKEN, "video_token_id") if takes_video(model)
                    else (llava_data.IMAGE_TOKEN, "image_token_id"))
    if tok.convert_tokens_to_ids(token) != getattr(model.config, field, None):
        raise ValueError(f"{name}: its tokenizer's {token} is not the model's {field}; this trainer uses the "
                         "digits-llava / digits-video recipes' data and needs a model made by one of them")
    return model.eval(), tok


def takes_video(model: nn.Module) -> bool:
    """Whether ``model`` answers about videos (``digits-video``: VideoLLM-MoD) rather than images (p-MoD)."""
    from mmskip.registry import get_adapter

    return bool(get_adapter(model, "vlm").takes_video)


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


def video_batches(tokenizer: Any, batch: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless training batches of the digits-video recipe's data (train digits + augmented copies, 1-5
    class palettes, 1 or 2 clips a batch), one question per video, teacher-forced with labels on the
    answer and ``</s>``."""
    from mmskip.zoo import video_data as D

    bank = D.digit_bank("train", copies=D.COPIES, seed=seed)
    g = torch.Generator().manual_seed(seed)
    while True:
        c = int(torch.randint(1, D.MAX_CLIPS + 1, (), generator=g))
        videos = D.make_videos(bank, batch, g, palette=D.PALETTE, clips=(c, c))
        b = D.make_batch(tokenizer, videos, *D.sample_questions(videos, g))
        yield {"input_ids": b.input_ids, "attention_mask": b.attention_mask,
               "pixel_values_videos": b.pixel_values_videos, "labels": b.labels}


def heldout(tokenizer: Any, n_per_type: int, video: bool = False) -> Any:
    """The first ``n_per_type`` questions of each type of the recipe's held-out set (seed 1234, held-out
    digits; the questions ``benchmarks/vision_tokens.py`` / ``video_tokens.py`` use)."""
    from mmskip.zoo import llava_data, video_data

    D = video_data if video else llava_data
    full = D.heldout_set(tokenizer, max(n_per_type, 500))
    pick = [i for t in D.QTYPES for i in [j for j, q in enumerate(full.qtypes) if q == t][:n_per_type]]
    rest = (full.input_ids[pick], full.attention_mask[pick], full.labels[pick], full.answer_pos[pick],
            [full.qtypes[i] for i in pick], [full.questions[i] for i in pick], [full.answers[i] for i in pick])
    first = full.videos[torch.tensor(pick)] if video else full.pixel_values[pick]
    return D.Batch(first, *rest)
