"""``mmskip.tune`` targets of the vision wing: VLMs (LLaVA, LLaVA-OneVision, Qwen2-VL) and Florence-2.

An input is one question as the model's processor gives it for a single row: a dict of model
keyword arguments (``input_ids`` and ``attention_mask`` of one row, ``pixel_values`` /
``pixel_values_videos`` / grids with a leading batch of 1 or, for Qwen2-VL, the row's flattened
patches), optionally with the true ``answer`` (text, with ``tokenizer=``) and a ``qtype``. Inputs are
batched ``batch_size`` at a time (padded the way the model's processor pads: left for decoder VLMs,
right for Florence-2) and answered greedily with ``max_new_tokens`` tokens (stopping at EOS).

Quality is measured against the unmodified model's answers: ``answer_agreement`` (share of identical
answers, the default metric) and, when every input carries its ``answer``, ``accuracy`` and
``accuracy_delta`` (accuracy minus the unmodified model's, in fractions: a floor of -0.01 keeps it within
one point). With the zoo's ``digits-llava`` / ``digits-video`` / ``digits-florence`` and their tokenizer,
:meth:`default_inputs` gives held-out questions of the zoo's fixed evaluation set.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mmskip.tuning.space import Space, TuneContext, spaces_of
from mmskip.tuning.target import ModelTarget

__all__ = ["VLMTarget", "Florence2Target", "is_vlm", "is_florence2", "register"]

logger = logging.getLogger(__name__)

META_KEYS = ("answer", "qtype", "question", "task")  # carried with an input, never passed to the model
_SEQ_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def _has_adapter(obj: Any, kind: str) -> bool:
    from mmskip.registry import UnsupportedModelError, get_adapter

    if not isinstance(obj, nn.Module):
        return False
    try:
        get_adapter(obj, kind)
    except UnsupportedModelError:
        return False
    return True


def is_vlm(obj: Any) -> bool:
    """A decoder VLM the vision registry knows (LLaVA, LLaVA-OneVision, Qwen2-VL / 2.5-VL)."""
    return _has_adapter(obj, "vlm")


def is_florence2(obj: Any) -> bool:
    """A Florence-2 model (registry kind ``"encdec-vlm"``)."""
    return _has_adapter(obj, "encdec-vlm")


def _eq(a: Any, b: Any) -> bool:
    return a["tokens"] == b["tokens"]


class _AnswerTarget(ModelTarget):
    """Shared machinery: batching question dicts, greedy answers, agreement and accuracy."""

    pad_side = "left"
    default_floor = 0.99
    metric = "answer_agreement"

    def __init__(self, model: nn.Module, tokenizer: Any = None, max_new_tokens: int = 4, batch_size: int = 8) -> None:
        super().__init__(model)
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
        self.tokenizer, self.max_new_tokens, self.batch_size = tokenizer, max_new_tokens, batch_size
        gen = getattr(model, "generation_config", None)
        pad = getattr(tokenizer, "pad_token_id", None)
        pad = pad if pad is not None else getattr(gen, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else getattr(model.config, "pad_token_id", None) or 0)
        eos = getattr(gen, "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self._keys: tuple[str, ...] | None = None
        self._stock: list[dict[str, Any]] | None = None

    # -- inputs ---------------------------------------------------------------------------------
    def check_inputs(self, inputs: Sequence[Any], name: str) -> list[dict[str, Any]]:
        what = ("a list of dicts, one question each: the model's keyword arguments for one row (input_ids, "
                "attention_mask, pixel_values ...), optionally with its true 'answer'")
        if isinstance(inputs, (str, dict, torch.Tensor)) or not isinstance(inputs, Sequence):
            raise TypeError(f"{name} must be {what}; got {type(inputs).__name__}")
        if not inputs:
            raise ValueError(f"{name} is empty; give at least one question ({what})")
        out = []
        for i, x in enumerate(inputs):
            if not isinstance(x, dict) or "input_ids" not in x:
                raise TypeError(f"{name}[{i}] must be a dict with input_ids ({what}); got {type(x).__name__}")
            item = dict(x)
            ids = torch.as_tensor(item["input_ids"])
            if ids.dim() == 2 and ids.shape[0] == 1:
                ids = ids[0]
            if ids.dim() != 1 or ids.is_floating_point() or len(ids) == 0:
                raise TypeError(f"{name}[{i}]['input_ids'] must be one non-empty row of token ids, got shape "
                                f"{tuple(ids.shape)}")
            item["input_ids"] = ids
            for k in _SEQ_KEYS[1:]:
                if k in item:
                    v = torch.as_tensor(item[k]).reshape(-1)
                    if len(v) != len(ids):
                        raise ValueError(f"{name}[{i}]['{k}'] has {len(v)} entries for {len(ids)} input_ids")
                    item[k] = v
            item.setdefault("attention_mask", torch.ones_like(ids))
            if "answer" in item and not isinstance(item["answer"], str):
                raise TypeError(f"{name}[{i}]['answer'] must be the answer's text, got {type(item['answer']).__name__}")
            if "answer" in item and self.tokenizer is None:
                raise ValueError(f"{name}[{i}] has an 'answer': pass tokenizer= so answers can be compared as text")
            keys = tuple(sorted(k for k in item if k not in META_KEYS))
            if self._keys is not None and keys != self._keys:
                raise ValueError(f"{name}[{i}] has arguments {list(keys)}, the other inputs {list(self._keys)}; give "
                                 "every question the same kind of arguments (batches are stacked)")
            self._keys = keys
            out.append(item)
        return out

    def _collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """One padded batch of model arguments from question dicts (padding on ``pad_side``)."""
        width = max(len(x["input_ids"]) for x in items)
        dev = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        batch: dict[str, Any] = {}
        for k in self._keys or ():
            vals = [x[k] for x in items]
            if k in _SEQ_KEYS:
                fill = self.pad_id if k == "input_ids" else 0
                rows = []
                for v in vals:
                    pad = torch.full((width - len(v),), fill, dtype=v.dtype)
                    rows.append(torch.cat([pad, v] if self.pad_side == "left" else [v, pad]))
                batch[k] = torch.stack(rows).to(dev)
            elif isinstance(vals[0], torch.Tensor):
                t = torch.cat([torch.as_tensor(v) for v in vals])
                batch[k] = t.to(dev, dtype) if t.is_floating_point() else t.to(dev)
            else:
                raise TypeError(f"argument {k!r} is a {type(vals[0]).__name__}; give tensors (batches are stacked)")
        return batch

    # -- runs -----------------------------------------------------------------------------------
    def _answer_tokens(self, out: torch.Tensor, prompt_len: int) -> list[tuple[int, ...]]:
        raise NotImplementedError

    @torch.no_grad()
    def generate(self, model: nn.Module, inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        answers = []
        for s in range(0, len(inputs), self.batch_size):
            chunk = inputs[s:s + self.batch_size]
            batch = self._collate(chunk)
            out = model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                 pad_token_id=self.pad_id)
            for toks, item in zip(self._answer_tokens(out, batch["input_ids"].shape[1]), chunk, strict=True):
                text = (self.tokenizer.decode(list(toks), skip_special_tokens=True).strip()
                        if self.tokenizer is not None else None)
                answers.append({"tokens": toks, "text": text, "answer": item.get("answer")})
        return answers

    def _cut(self, row: list[int]) -> tuple[int, ...]:
        """Tokens up to the first EOS (excluded; what follows it is padding)."""
        out = []
        for t in row:
            if t in self.eos_ids:
                break
            out.append(t)
        return tuple(out)

    def quality(self, outputs: Any, reference: Any) -> dict[str, float]:
        """``answer_agreement`` with the unmodified model; ``accuracy`` / ``accuracy_delta`` with true answers."""
        if len(outputs) != len(reference) or not reference:
            raise ValueError(f"{len(outputs)} answers for {len(reference)} reference answers")
        q = {"answer_agreement": sum(_eq(o, r) for o, r in zip(outputs, reference, strict=True)) / len(reference)}
        if all(r.get("answer") is not None for r in reference):
            acc = sum(o["text"] == o["answer"] for o in outputs) / len(outputs)
            q["accuracy"] = acc
            q["accuracy_delta"] = acc - sum(r["text"] == r["answer"] for r in reference) / len(reference)
        return q

    # -- stock inputs ---------------------------------------------------------------------------
    def _stock_inputs(self) -> list[dict[str, Any]] | None:
        return None

    def default_inputs(self, n: int, offset: int = 0) -> list[dict[str, Any]]:
        """Questions ``offset .. offset + n`` of the zoo model's held-out set (question types interleaved);
        ``ValueError`` for a model that is not a zoo model with its tokenizer."""
        if self._stock is None:
            self._stock = self._stock_inputs()
        if self._stock is None:
            raise ValueError(f"{type(self.model).__name__}: stock questions exist only for the zoo's digits models "
                             "with their tokenizer (tokenizer=); give inputs: dicts of model arguments per question")
        if offset + n > len(self._stock):
            raise ValueError(f"the held-out set has {len(self._stock)} questions; ask for at most "
                             f"{len(self._stock) - offset} from {offset}")
        return self._stock[offset:offset + n]


def _interleave(types: list[str]) -> list[int]:
    """Indices ordering a type-blocked set as type 0, type 1, ..., type 0, ... (each prefix balanced)."""
    by: dict[str, list[int]] = {}
    for i, t in enumerate(types):
        by.setdefault(t, []).append(i)
    lists = list(by.values())
    return [lst[k] for k in range(max(map(len, lists))) for lst in lists if k < len(lst)]


class VLMTarget(_AnswerTarget):
    """A decoder VLM (LLaVA / LLaVA-OneVision / Qwen2-VL): greedy short answers to question dicts,
    scored by ``answer_agreement`` with the unmodified model (and accuracy when answers are given).

    Options: ``tokenizer`` (decodes answers; the zoo's gives stock questions), ``max_new_tokens``
    (default 4), ``batch_size`` (default 32: larger batches amortize per-call overhead), ``routers``
    (a folder of trained p-MoD routers: adds the ``"router"`` signal to the search)."""

    kind = "vlm"
    pad_side = "left"

    def __init__(self, model: nn.Module, tokenizer: Any = None, max_new_tokens: int = 4, batch_size: int = 32,
                 routers: str | None = None) -> None:
        super().__init__(model, tokenizer, max_new_tokens, batch_size)
        from mmskip.registry import get_adapter

        self.adapter = get_adapter(model, "vlm")
        self.routers = routers

    def spaces(self) -> list[Space]:
        from mmskip.inject import SkipConfig

        keys = self._keys or ()
        facts = {"video": any("video" in k for k in keys), "images": any(k.startswith("pixel_values") and "video"
                                                                          not in k for k in keys),
                 "routers": self.routers}
        ctx = TuneContext(self.model, "vlm", num_layers=self.adapter.num_layers, facts=facts)
        return spaces_of(SkipConfig.registered(), ctx)

    def _answer_tokens(self, out: torch.Tensor, prompt_len: int) -> list[tuple[int, ...]]:
        return [self._cut(row) for row in out[:, prompt_len:].tolist()]

    def _stock_inputs(self) -> list[dict[str, Any]] | None:
        tok = self.tokenizer
        if tok is None:
            return None
        vocab = tok.get_vocab()
        cfg = self.model.config
        video_id = getattr(cfg, "video_token_index", getattr(cfg, "video_token_id", None))
        if "<video>" in vocab and vocab["<video>"] == video_id:
            from mmskip.zoo import video_data as V

            data = V.heldout_set(tok, 200)
            items = []
            for i in _interleave(data.qtypes):
                enc = V.encode(tok, data.videos[i], [data.questions[i]])
                items.append({**enc, "answer": data.answers[i], "qtype": data.qtypes[i]})
            return items
        from mmskip.zoo import llava_data as D

        if vocab.get(D.IMAGE_TOKEN) != getattr(cfg, "image_token_id", getattr(cfg, "image_token_index", None)) or \
                "row1" not in vocab:
            return None
        data = D.heldout_set(tok, 500)
        items = []
        for i in _interleave(data.qtypes):
            ids = torch.tensor(tok(D.prompt_text(data.questions[i]))["input_ids"])
            items.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                          "pixel_values": data.pixel_values[i:i + 1], "answer": data.answers[i],
                          "qtype": data.qtypes[i]})
        return items


class Florence2Target(_AnswerTarget):
    """Florence-2 (encoder-decoder): greedy answers of up to ``max_new_tokens`` (default 12) tokens,
    one question at a time by default (``batch_size=1``: MuE's exits save time per row), scored by
    ``answer_agreement`` (exact match with the unmodified model's answer), ``token_agreement``
    (share of each answer equal before the first difference) and accuracy when answers are given."""

    kind = "encoder_decoder"
    pad_side = "right"

    def __init__(self, model: nn.Module, tokenizer: Any = None, max_new_tokens: int = 12, batch_size: int = 1) -> None:
        super().__init__(model, tokenizer, max_new_tokens, batch_size)
        from mmskip.registry import get_adapter

        self.adapter = get_adapter(model, "encdec-vlm")

    def spaces(self) -> list[Space]:
        from mmskip.inject import SkipConfig

        facts = {"encoder_layers": self.adapter.num_encoder_layers, "decoder_layers": self.adapter.num_decoder_layers}
        ctx = TuneContext(self.model, "encoder_decoder", num_layers=self.adapter.num_decoder_layers, facts=facts)
        return spaces_of(SkipConfig.registered(), ctx)

    def _answer_tokens(self, out: torch.Tensor, prompt_len: int) -> list[tuple[int, ...]]:
        return [self._cut(row[1:]) for row in out.tolist()]  # row[0]: the decoder start token

    def quality(self, outputs: Any, reference: Any) -> dict[str, float]:
        q = super().quality(outputs, reference)
        prefix = 0.0
        for o, r in zip(outputs, reference, strict=True):
            a, b = o["tokens"], r["tokens"]
            same = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            prefix += same / len(b) if b else float(not a)
        q["token_agreement"] = prefix / len(reference)
        return q

    def _stock_inputs(self) -> list[dict[str, Any]] | None:
        from mmskip.zoo import florence_data as F

        tok = self.tokenizer
        if tok is None or tok.get_vocab().get(F.IMAGE_TOKEN) != getattr(self.model.config, "image_token_id", None) \
                or "describe" not in tok.get_vocab():
            return None
        data = F.heldout_set(tok, 100)
        items = []
        for i in _interleave(data.tasks):
            n = int(data.attention_mask[i].sum())
            items.append({"input_ids": data.input_ids[i, :n], "attention_mask": data.attention_mask[i, :n],
                          "pixel_values": data.pixel_values[i:i + 1], "answer": data.targets[i],
                          "task": data.tasks[i]})
        return items


def register() -> None:
    """Let ``mmskip.tune`` take VLMs and Florence-2 models (called when ``mmskip.vision`` is imported)."""
    from mmskip.tuning import register_target

    register_target(is_florence2, Florence2Target)
    register_target(is_vlm, VLMTarget)
