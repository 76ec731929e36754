"""MuE's encoder hooks: the image-token mask, the exit mask, packed encoder layers.

- ``PlaceholderHook`` on the adapter's ``mm_model`` wraps its ``placeholder_method``
  (``get_placeholder_mask`` on ``Florence2Model``, ``get_image_placeholder_mask`` on
  ``T5Gemma2Encoder``) on the instance (undone on ``remove()``) so the image-token mask is captured
  both in a plain forward and inside ``generate``, where the encoder runs outside ``forward``.
- ``EncoderHook`` on the encoder opens an :class:`EncoderPass` (image mask, padding, exit mask);
  ``EncoderLayerHook`` runs each layer on the tokens still going, packed as queries (the adapter
  says how the layer is called), while ``EncoderKVHook`` on its attention hands every token to the
  keys/values; then it decides who exits.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from diffusers.hooks import ModelHook

from mmskip._phase import ArgumentsHook
from mmskip.inject import CallGuard, SkipHandle

from ..adapters import EncDecVLMAdapter
from .decoder import run_eagerly
from .state import NEVER, EncoderPass, EncoderRecord, MuEState, cosine, guarded, or_never

__all__ = ["PlaceholderHook", "EncoderHook", "EncoderKVHook", "EncoderLayerHook"]

logger = logging.getLogger("mmskip.vision.mue")

_MISSING = object()


class PlaceholderHook(ModelHook):
    """Wraps the adapter's ``placeholder_method`` (``get_placeholder_mask`` on Florence-2) on the
    module instance: the image mask it returns is kept for the next encoder call on this thread.
    ``deinitalize_hook`` (on ``remove()``) unwraps it."""

    def __init__(self, state: MuEState) -> None:
        super().__init__()
        self.state = state
        self.method = state.adapter.placeholder_method
        self._saved: Any = _MISSING

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._saved = module.__dict__.get(self.method, _MISSING)
        original = getattr(module, self.method)
        state = self.state

        @functools.wraps(original)
        def placeholder_mask(*args: Any, **kwargs: Any) -> torch.Tensor:
            mask = original(*args, **kwargs)
            state.capture_image_mask(mask)
            return mask

        setattr(module, self.method, placeholder_mask)
        return module

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        if self.state.pending:  # a new forward: forget a mask whose call never reached the encoder
            self.state.take_image_mask()  # (read only when one waits: no thread id in a compiled decoder step)
        return args, kwargs

    def deinitalize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        if self._saved is _MISSING:
            module.__dict__.pop(self.method, None)
        else:
            setattr(module, self.method, self._saved)
        return module


class EncoderHook(ArgumentsHook):
    """On the encoder: opens the :class:`EncoderPass` the layer hooks share, records it when done."""

    def __init__(self, state: MuEState, handle: SkipHandle, guard: CallGuard, measures: bool = True) -> None:
        super().__init__()
        self.state, self.handle, self.guard = state, handle, guard
        # False: no threshold can trigger, so no layer hook is attached and this hook counts the layers
        self.measures = measures
        L = state.adapter.num_encoder_layers
        self.names = [n for i in range(L) for n in (f"encoder.{i}", f"encoder.{i}.kv")]

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.measures and torch.compiler.is_compiling():
            return run_eagerly(self.new_forward, module, *args, **kwargs)  # one break: exits decided eagerly
        bound = self.arguments(args, kwargs)
        x = bound.get("inputs_embeds")
        x = bound.get("input_ids") if x is None else x
        st = self.state
        image = st.take_image_mask()
        if x is None:  # transformers raises its own error
            return self.fn_ref.original_forward(*args, **kwargs)
        if not self.measures:
            return self._counted(x, image, bound.get("attention_mask"), args, kwargs)
        with guarded(self.guard, starts=True):
            st.enc = self._open(x, image, bound.get("attention_mask"))
            try:
                out = self.fn_ref.original_forward(*args, **kwargs)
            except BaseException:
                st.enc = None
                raise
            p, st.enc = st.enc, None
            st.encoder_record = EncoderRecord(image=p.image, valid=p.valid, exit_layer=p.exit_layer)
            return out

    def _counted(self, x: torch.Tensor, image: torch.Tensor | None, mask: Any, args: tuple, kwargs: dict) -> Any:
        """No exit can trigger: the plain encoder, every token counted through every layer."""
        st = self.state
        image, valid = self._masks(x, image, mask)
        out = self.fn_ref.original_forward(*args, **kwargs)
        self.handle.counts.record_each(self.names, image.numel())
        L = st.adapter.num_encoder_layers
        st.encoder_record = EncoderRecord(image=image, valid=valid, exit_layer=torch.where(valid, L, 0).long())
        return out

    def _masks(self, x: torch.Tensor, image: torch.Tensor | None, mask: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, valid): the (B, N) image-token and non-padding masks of encoder input ``x``; the
        pinned exits checked against it."""
        st = self.state
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
        pinned = st.pinned_encoder
        if pinned is not None and tuple(pinned.shape) != (B, N):
            raise ValueError(
                f"mmskip MuE: pinned encoder exits are for inputs of shape {tuple(pinned.shape)}, this one is "
                f"({B}, {N}); unpin_exits() or call with the inputs that were pinned"
            )
        return image, valid

    def _open(self, x: torch.Tensor, image: torch.Tensor | None, mask: Any) -> EncoderPass:
        st, cfg = self.state, self.state.config
        image, valid = self._masks(x, image, mask)
        (B, N), dev = image.shape, image.device
        L = st.adapter.num_encoder_layers
        pinned = None if st.pinned_encoder is None else st.pinned_encoder.to(dev)
        thr = torch.where(image, or_never(cfg.encoder_threshold("image")), or_never(cfg.encoder_threshold("text"))).float()
        return EncoderPass(
            layers=L, image=image, valid=valid, done=torch.zeros(B, N, dtype=torch.bool, device=dev),
            exit_layer=torch.where(valid, L, 0).long(), thr=thr, measure=cfg.encoder_active(), pinned=pinned,
        )


class EncoderKVHook(ModelHook):
    """On an encoder layer's self-attention: while ``source`` is set, the (packed) queries attend
    to keys/values computed from ``source`` (every token of the sequence; what the adapter's
    ``encoder_kv_source`` gave)."""

    def __init__(self, adapter: EncDecVLMAdapter) -> None:
        super().__init__()
        self.adapter = adapter
        self.source: Any = None

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.source is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        return self.adapter.packed_attention(module, self.fn_ref.original_forward, self.source, args, kwargs)


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
        adapter = self.state.adapter
        call_args, call_kwargs = adapter.pack_encoder_call(queries, idx, args, kwargs)
        self.kv.source = adapter.encoder_kv_source(self.index, h, args, kwargs)
        try:
            y = self.fn_ref.original_forward(*call_args, **call_kwargs)
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
            thr = p.thr.masked_fill(~sel, NEVER).amin(1)  # the modality's threshold (one value per row)
            new |= sel & (cos > thr)[:, None]
        return new
