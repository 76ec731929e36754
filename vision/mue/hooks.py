"""The hooks of MuE (:mod:`mmskip.vision.mue`): exit masks, packed encoder layers, the decoder KV rule.

- ``PlaceholderHook`` on the module with ``get_placeholder_mask`` (``Florence2Model``) wraps that
  method on the instance (undone on ``remove()``) so the image-token mask is captured both in a
  plain forward and inside ``generate``, where the encoder runs outside ``forward``.
- ``EncoderHook`` on the encoder opens an :class:`EncoderPass` (image mask, padding, exit mask);
  ``EncoderLayerHook`` runs each layer on the tokens still going, packed as queries, while
  ``EncoderKVHook`` on its attention hands every token to the keys/values; then it decides who
  exits.
- ``DecoderHook`` on the decoder opens a :class:`DecoderPass` per forward; ``DecoderLayerHook``
  runs, skips (only computing the exited tokens' K/V for the cache) or runs densely and keeps the
  exited tokens' state, then decides who exits.

:func:`attach_mue` puts them on a model (``mmskip.apply`` calls it through the config); the
per-call passes they share are in :mod:`mmskip.vision.mue.state`.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import TYPE_CHECKING, Any

import torch
from diffusers.hooks import ModelHook

from mmskip._phase import ArgumentsHook, HeadCounter, get_cache
from mmskip.inject import CallGuard, SkipHandle
from mmskip.registry import get_adapter

from ..adapters import EncDecVLMAdapter
from ..generation_replay import bind_generations
from .state import DecoderPass, EncoderPass, EncoderRecord, MuEState

if TYPE_CHECKING:
    from .config import MuEConfig

__all__ = [
    "PlaceholderHook",
    "EncoderHook",
    "EncoderLayerHook",
    "EncoderKVHook",
    "DecoderHook",
    "DecoderLayerHook",
    "attach_mue",
]

logger = logging.getLogger("mmskip.vision.mue")

_NEVER = 2.0  # a threshold the clamped cosine (<= 1) can never exceed
_MISSING = object()


def _thr(value: float | None) -> float:
    return _NEVER if value is None else float(value)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity over the last dim in float32, clamped to [-1, 1]."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8).clamp(-1.0, 1.0)


# -- the image-token mask ---------------------------------------------------------------------------


class PlaceholderHook(ModelHook):
    """Wraps ``get_placeholder_mask`` on the module instance: the image mask it returns is kept for
    the next encoder call on this thread. ``deinitalize_hook`` (on ``remove()``) unwraps it."""

    def __init__(self, state: MuEState) -> None:
        super().__init__()
        self.state = state
        self._saved: Any = _MISSING

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._saved = module.__dict__.get("get_placeholder_mask", _MISSING)
        original = module.get_placeholder_mask
        state = self.state

        @functools.wraps(original)
        def get_placeholder_mask(*args: Any, **kwargs: Any) -> torch.Tensor:
            mask = original(*args, **kwargs)
            state.capture_image_mask(mask)
            return mask

        module.get_placeholder_mask = get_placeholder_mask
        return module

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        self.state.take_image_mask()  # a new forward: forget a mask whose call never reached the encoder
        return args, kwargs

    def deinitalize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        if self._saved is _MISSING:
            module.__dict__.pop("get_placeholder_mask", None)
        else:
            module.get_placeholder_mask = self._saved
        return module


# -- encoder ----------------------------------------------------------------------------------------


class EncoderHook(ArgumentsHook):
    """On the encoder: opens the :class:`EncoderPass` the layer hooks share, records it when done."""

    def __init__(self, state: MuEState, handle: SkipHandle, guard: CallGuard) -> None:
        super().__init__()
        self.state, self.handle, self.guard = state, handle, guard

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        bound = self.arguments(args, kwargs)
        x = bound.get("inputs_embeds")
        x = bound.get("input_ids") if x is None else x
        st = self.state
        image = st.take_image_mask()
        if x is None:  # transformers raises its own error
            return self.fn_ref.original_forward(*args, **kwargs)
        with self.guard.call(starts=True):
            st.enc = self._open(x, image, bound.get("attention_mask"))
            try:
                out = self.fn_ref.original_forward(*args, **kwargs)
            except BaseException:
                st.enc = None
                raise
            p, st.enc = st.enc, None
            st.encoder_record = EncoderRecord(image=p.image, valid=p.valid, exit_layer=p.exit_layer)
            return out

    def _open(self, x: torch.Tensor, image: torch.Tensor | None, mask: Any) -> EncoderPass:
        st, cfg = self.state, self.state.config
        B, N = int(x.shape[0]), int(x.shape[1])
        dev = x.device
        if image is not None and tuple(image.shape) != (B, N):
            raise ValueError(
                f"mmskip MuE: the image-token mask has shape {tuple(image.shape)} but the encoder input is ({B}, {N}); "
                "call the model (or generate) with input_ids and pixel_values together"
            )
        if image is None or not bool(image.any()):
            if not st.warned_no_image:
                st.warned_no_image = True
                logger.warning("mmskip mue: an encoder input without image tokens: every token is text "
                               "(text_threshold applies); stats()['encoder']['image']['tokens'] == 0")
            image = torch.zeros(B, N, dtype=torch.bool, device=dev)
        image = image.to(dev)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tuple(mask.shape) == (B, N):
            valid = mask.to(dev).bool()
        else:
            valid = torch.ones(B, N, dtype=torch.bool, device=dev)
        L = st.adapter.num_encoder_layers
        pinned = st.pinned_encoder
        if pinned is not None:
            if tuple(pinned.shape) != (B, N):
                raise ValueError(
                    f"mmskip MuE: pinned encoder exits are for inputs of shape {tuple(pinned.shape)}, this one is "
                    f"({B}, {N}); unpin_exits() or call with the inputs that were pinned"
                )
            pinned = pinned.to(dev)
        thr = torch.where(image, _thr(cfg.encoder_threshold("image")), _thr(cfg.encoder_threshold("text"))).float()
        return EncoderPass(
            layers=L, image=image, valid=valid, done=torch.zeros(B, N, dtype=torch.bool, device=dev),
            exit_layer=torch.where(valid, L, 0).long(), thr=thr, measure=cfg.encoder_active(), pinned=pinned,
        )


class EncoderKVHook(ModelHook):
    """On an encoder layer's self-attention: while ``source`` is set, the (packed) queries attend
    to keys/values computed from ``source`` (every token of the sequence)."""

    def __init__(self) -> None:
        super().__init__()
        self.source: torch.Tensor | None = None

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.source is not None:
            kwargs = {**kwargs, "key_value_states": self.source}
        return self.fn_ref.original_forward(*args, **kwargs)


class EncoderLayerHook(ModelHook):
    """An encoder layer under MuE: exited tokens pass unchanged; the others run as packed queries
    over all tokens' keys/values; then the tokens whose cosine exceeds their threshold exit."""

    def __init__(self, index: int, state: MuEState, handle: SkipHandle, kv: EncoderKVHook) -> None:
        super().__init__()
        self.index, self.state, self.handle, self.kv = index, state, handle, kv

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        p = self.state.enc
        if p is None:  # called outside an encoder pass: the plain layer
            return self.fn_ref.original_forward(*args, **kwargs)
        h = args[0] if args else kwargs["hidden_states"]
        B, N, D = h.shape
        run = p.valid & ~p.done  # real tokens that run this layer
        if not bool(p.done.any()):
            out = self.fn_ref.original_forward(*args, **kwargs)
            computed = B * N
        else:
            out, computed = self._packed(h, run, args, kwargs)
        i = self.index
        self.handle.counts.record(f"encoder.{i}", B * N, B * N - computed)
        self.handle.counts.record(f"encoder.{i}.kv", B * N, B * N if computed == 0 else 0)
        if i < p.layers - 1 and (p.measure or p.pinned is not None):
            new = self._exits(h, out, run, p)
            p.done |= new
            p.exit_layer = torch.where(new, i + 1, p.exit_layer)
        return out

    def _packed(self, h: torch.Tensor, run: torch.Tensor, args: tuple, kwargs: dict) -> tuple[torch.Tensor, int]:
        B, N, D = h.shape
        P = int(run.sum(1).max())
        if P == 0:
            return h, 0  # every token has exited: nothing runs (no query needs keys/values)
        idx = run.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :P]  # running tokens first, in order
        keep = run.gather(1, idx)
        queries = h.gather(1, idx[..., None].expand(B, P, D))
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        rest = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "attention_mask")}
        self.kv.source = h
        try:
            y = self.fn_ref.original_forward(queries, _rows(mask, idx), *args[2:], **rest)
        finally:
            self.kv.source = None
        y = torch.where(keep[..., None], y, queries)  # filler rows (shorter rows) keep their state
        return h.scatter(1, idx[..., None].expand(B, P, D), y), B * P

    def _exits(self, h: torch.Tensor, out: torch.Tensor, run: torch.Tensor, p: EncoderPass) -> torch.Tensor:
        if p.pinned is not None:
            return run & (p.pinned == self.index + 1)
        if self.state.config.encoder_granularity == "token":
            return run & (cosine(h, out) > p.thr)
        # the authors' rule: per row and modality, the cosine of the flattened block of running tokens
        a, b = h.float(), out.float()
        dot, na, nb = (a * b).sum(-1), (a * a).sum(-1), (b * b).sum(-1)
        new = torch.zeros_like(run)
        for modality in (p.image, ~p.image):
            sel = run & modality
            w = sel.float()
            cos = ((dot * w).sum(1) / ((na * w).sum(1) * (nb * w).sum(1)).sqrt().clamp_min(1e-8)).clamp(-1.0, 1.0)
            thr = p.thr.masked_fill(~sel, _NEVER).amin(1)  # the modality's threshold (one value per row)
            new |= sel & (cos > thr)[:, None]
        return new


def _rows(mask: Any, idx: torch.Tensor) -> Any:
    """The encoder's attention mask restricted to the packed query rows ``idx`` (B, P); keys stay."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"mmskip MuE packs encoder queries and supports the sdpa / eager masks (tensors), got {type(mask).__name__}; "
            "load the model with attn_implementation='sdpa' or 'eager'"
        )
    if mask.dim() == 2:
        raise TypeError(
            "mmskip MuE: a padded batch under flash attention (2-D mask) cannot pack encoder queries; load the model "
            "with attn_implementation='sdpa' or 'eager', or do not pad"
        )
    if mask.dim() != 4:
        raise TypeError(f"mmskip MuE: unexpected encoder attention mask of shape {tuple(mask.shape)}")
    if mask.shape[2] == 1:
        return mask  # one row broadcast over every query
    B, P = idx.shape
    m = mask.expand(B, *mask.shape[1:])
    return m.gather(2, idx[:, None, :, None].expand(B, m.shape[1], P, m.shape[3]))


# -- decoder ----------------------------------------------------------------------------------------


class DecoderHook(ArgumentsHook):
    """On the decoder: opens a :class:`DecoderPass` per forward and records its exits."""

    def __init__(self, state: MuEState, handle: SkipHandle, guard: CallGuard) -> None:
        super().__init__()
        self.state, self.handle, self.guard = state, handle, guard

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        bound = self.arguments(args, kwargs)
        x = bound.get("inputs_embeds")
        x = bound.get("input_ids") if x is None else x
        if x is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        cache = get_cache(bound)
        past = int(cache.get_seq_length()) if cache is not None else 0
        st = self.state
        gen = st.generations.current()
        no_cache = cache is None or bound.get("use_cache") is False
        with self.guard.call(starts=past == 0):
            # generate(use_cache=False) recomputes every position at each step: earlier ones replay their exits
            replay = gen.decisions if gen is not None and gen.forwards > 0 and no_cache else None
            st.dec = self._open(int(x.shape[0]), int(x.shape[1]), past, x.device, replay)
            try:
                out = self.fn_ref.original_forward(*args, **kwargs)
            except BaseException:
                st.dec = None
                raise
            p, st.dec = st.dec, None
            self._record(p)
            if gen is not None:
                gen.forwards += 1
                gen.decisions = p.exit_layer if no_cache else None
            return out

    def _open(self, B: int, q: int, past: int, dev: torch.device, replay: torch.Tensor | None) -> DecoderPass:
        st, cfg = self.state, self.state.config
        L = st.adapter.num_decoder_layers
        pinned, measure_from = st.pinned_decoder, 0
        if pinned is None and replay is not None and replay.shape[0] == B and replay.shape[1] < q:
            measure_from = replay.shape[1]
            pinned = torch.cat([replay.to(dev), replay.new_full((B, q - measure_from), -1, device=dev)], dim=1)
        elif pinned is not None:
            measure_from = q
            if pinned.shape[0] != B or pinned.shape[1] < past + q:
                raise ValueError(
                    f"mmskip MuE: pinned decoder exits cover {pinned.shape[0]} rows x {pinned.shape[1]} positions; this "
                    f"forward needs {B} rows x positions {past}..{past + q - 1}. unpin_exits() or stay within them"
                )
            pinned = pinned[:, past: past + q].to(dev)
        thr = torch.tensor([_thr(cfg.decoder_threshold_at(past + j)) for j in range(q)], device=dev)
        return DecoderPass(
            layers=L, batch=B, q=q, past=past, done=torch.zeros(B, q, dtype=torch.bool, device=dev),
            exit_layer=torch.full((B, q), L, dtype=torch.long, device=dev), thr=thr,
            measure=L > 1 and bool((thr < 1.0).any()), pinned=pinned, measure_from=measure_from,
        )

    def _record(self, p: DecoderPass) -> None:
        st = self.state
        if p.past == 0:
            st.decoder_exits, st.decoder_dense, st.decoder_complete = p.exit_layer, p.dense, True
            return
        prev = st.decoder_exits
        st.decoder_dense += p.dense
        if prev is not None and st.decoder_complete and tuple(prev.shape) == (p.batch, p.past):
            st.decoder_exits = torch.cat([prev, p.exit_layer.to(prev.device)], dim=1)
        else:
            st.decoder_exits, st.decoder_complete = p.exit_layer, False


class DecoderLayerHook(ModelHook):
    """A decoder layer under MuE. Tokens that exited pass their state on unchanged, and this
    layer's self-attention K/V for them are computed from that state (the KV rule): when every
    token of the forward has exited, only those K/V run (appended to the cache); in a mixed batch
    the layer runs densely and the exited tokens' outputs are replaced by their inputs."""

    def __init__(self, index: int, state: MuEState, handle: SkipHandle) -> None:
        super().__init__()
        self.index, self.state, self.handle = index, state, handle

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        p = self.state.dec
        if p is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        h = args[0] if args else kwargs["hidden_states"]
        i, n = self.index, p.batch * p.q
        kv_skipped = rest_skipped = 0
        if not bool(p.done.any()):
            out = self.fn_ref.original_forward(*args, **kwargs)
        elif bool(p.done.all()):
            cache = get_cache(kwargs)
            if cache is not None and kwargs.get("use_cache", True) is not False:
                self._append_kv(cache, h)
            else:
                kv_skipped = n  # no cache and no running query: nobody needs this layer's K/V
            out, rest_skipped = h, n
        else:
            out = self.fn_ref.original_forward(*args, **kwargs)
            out = torch.where(p.done[..., None], h, out)
            p.dense += int(p.done.sum())
        self.handle.counts.record(f"decoder.{i}", n, rest_skipped)
        self.handle.counts.record(f"decoder.{i}.kv", n, kv_skipped)
        st = self.state
        if i + 1 >= st.min_layers and i < p.layers - 1 and (p.measure or p.pinned is not None):
            run, k = ~p.done, p.measure_from
            new = run & (p.pinned == i + 1) if p.pinned is not None else torch.zeros_like(run)
            if p.measure and k < p.q:
                new[:, k:] |= run[:, k:] & (cosine(h[:, k:], out[:, k:]) > p.thr[None, k:])
            p.done |= new
            p.exit_layer = torch.where(new, i + 1, p.exit_layer)
        return out

    def _append_kv(self, cache: Any, h: torch.Tensor) -> None:
        adapter = self.state.adapter
        k, v = adapter.self_kv(self.index, h)
        target = getattr(cache, "self_attention_cache", cache)
        target.update(k, v, adapter.cache_index(self.index))


def attach_mue(config: MuEConfig, model: torch.nn.Module, handle: SkipHandle) -> None:
    """Attach MuE to ``model``: the placeholder, encoder and decoder hooks, one hook per encoder layer
    (and its attention's K/V) and per decoder layer, the head counter; ``handle.state`` = a new
    :class:`MuEState`. Called by ``mmskip.apply(model, config)``."""
    adapter: EncDecVLMAdapter = get_adapter(model, "encdec-vlm")
    L = adapter.num_decoder_layers
    if config.decoder_schedule is not None:
        asked, name = max(1, config.decoder_schedule.warmup), "decoder_schedule.warmup"
    else:
        asked, name = config.min_layers, "min_layers"
    if asked is not None and asked >= L:
        raise ValueError(
            f"MuEConfig.{name}={asked} leaves no decoder layer to exit after: "
            f"{type(model).__name__}'s decoder has {L} layers and a token can exit after layers 1..{L - 1}"
        )
    for sched_name in ("image_schedule", "text_schedule"):
        sched = getattr(config, sched_name)
        if sched is not None and sched.num is not None and sched.num != adapter.num_encoder_layers:
            raise ValueError(
                f"MuEConfig.{sched_name} was built for num={sched.num} layers but {type(model).__name__}'s encoder "
                f"has {adapter.num_encoder_layers}; leave num=None"
            )
    min_layers = asked if asked is not None else max(1, math.ceil(L / 3))
    state = MuEState(config=config, adapter=adapter, min_layers=min_layers)
    guard = CallGuard(config.technique)
    counts = handle.counts
    for i in range(adapter.num_encoder_layers):
        kv, rest = adapter.encoder_costs(i)
        counts.cost[f"encoder.{i}"], counts.cost[f"encoder.{i}.kv"] = rest, kv
    for i in range(L):
        kv, rest = adapter.decoder_costs(i)
        counts.cost[f"decoder.{i}"], counts.cost[f"decoder.{i}.kv"] = rest, kv
    handle.add_hook(adapter.mm_model, PlaceholderHook(state), ".placeholder")
    handle.add_hook(adapter.encoder, EncoderHook(state, handle, guard), ".encoder")
    for i, layer in enumerate(adapter.encoder_layers):
        kv_hook = EncoderKVHook()
        handle.add_hook(layer.self_attn, kv_hook, ".kv")
        handle.add_hook(layer, EncoderLayerHook(i, state, handle, kv_hook), ".layer")
    handle.add_hook(adapter.decoder, DecoderHook(state, handle, guard), ".decoder")
    bind_generations(handle, model, state.generations)  # generate(use_cache=False) replays its exits
    for i, layer in enumerate(adapter.decoder_layers):
        handle.add_hook(layer, DecoderLayerHook(i, state, handle), ".layer")
    if adapter.head is not None:
        counts.fixed_cost = adapter.head_flops()
        handle.add_hook(adapter.head, HeadCounter(handle), ".head")
    handle.state = state
    logger.debug("mue: %d encoder / %d decoder layers, decoder min_layers %d", adapter.num_encoder_layers, L,
                 min_layers)

