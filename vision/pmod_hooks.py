"""The hooks of p-MoD (:mod:`mmskip.vision.pmod`): routing, packing and the per-layer KV rule.

``InputHook`` on the module that receives ``input_ids`` tells prefill from decode, records where
the vision tokens are and holds the concurrency guard; ``MoDLayerHook`` runs a MoD layer on the
packed kept tokens (prefill) or against the layer's own kept cache (decode); ``MlpScaleHook``
applies the router weight to the MLP output (STRing); ``CaptureHook`` keeps a layer's input for
the ``"norm"`` signal of the next layer.
"""

from __future__ import annotations

import inspect
import math
from typing import TYPE_CHECKING, Any

import torch
from diffusers.hooks import ModelHook

from mmskip._phase import get_cache
from mmskip.inject import CallGuard, SkipHandle

if TYPE_CHECKING:
    from .pmod import MoDState

__all__ = ["InputHook", "MoDLayerHook", "MlpScaleHook", "CaptureHook"]


class MlpScaleHook(ModelHook):
    """STRing on kept tokens: the MLP's output is multiplied by the router weight ``w``."""

    def __init__(self) -> None:
        super().__init__()
        self.scale: torch.Tensor | None = None

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        return output if self.scale is None else output * self.scale


class CaptureHook(ModelHook):
    """``"norm"`` signal: remembers a layer's input during prefill (the next layer compares)."""

    def __init__(self, index: int, state: MoDState) -> None:
        super().__init__()
        self.index, self.state = index, state

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        if self.state.phase == "prefill" and self.state.mode == "mod":
            self.state.prev_input[self.index] = args[0] if args else kwargs["hidden_states"]
        return args, kwargs


class InputHook(ModelHook):
    """On the module that receives ``input_ids``: prefill vs decode, the vision mask, the guard."""

    def __init__(self, state: MoDState, handle: SkipHandle) -> None:
        super().__init__()
        self.state, self.handle = state, handle
        self.guard = CallGuard(handle.config.technique)
        self.signature: inspect.Signature | None = None

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.signature is None:
            self.signature = inspect.signature(self.fn_ref.original_forward)
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        extra = bound.get("kwargs", {})
        cache = bound.get("cache", bound.get("past_key_values", extra.get("past_key_values")))
        past = int(cache.get_seq_length()) if cache is not None else 0
        st = self.state
        vision = st.adapter.vision_mask(bound.get("input_ids"), bound.get("inputs_embeds"))
        if past > 0 and bool(vision.any()):
            raise ValueError(
                "mmskip p-MoD: vision tokens arrived in a forward that continues a cache; images must be in the "
                "first forward (the prefill) of a generation. Start a new generation with the whole prompt."
            )
        if past == 0 and cache is not None:
            self._check_cache(cache)
        if past > 0 and st.mode != "none" and vision.shape[0] != st.batch:
            raise ValueError(
                f"mmskip p-MoD: this decode step has batch {vision.shape[0]} but the prefill had {st.batch}"
            )
        with self.guard.call(starts=past == 0):  # refuses a second thread before any state changes
            B, q = vision.shape
            if past == 0:
                st.reset()
                st.batch, st.prompt_len = B, q
                st.mode = "mod" if bool(vision.any()) else "plain"
                st.vision = vision
                st.n_vision = vision.sum(1).tolist()
                pad = bound.get("attention_mask")
                st.pad = pad.bool() if isinstance(pad, torch.Tensor) and pad.dim() == 2 else None
                if st.pad is not None:
                    st.last = (q - 1) - st.pad.flip(1).to(torch.int64).argmax(1)
                else:
                    st.last = torch.full((B,), q - 1, dtype=torch.long, device=vision.device)
                st.phase = "prefill"
            else:
                st.phase = "decode"
            st.past = past
            for i in range(st.adapter.num_layers):
                self.handle.counts.record(f"layer.{i}", B * q)
            try:
                return self.fn_ref.original_forward(*args, **kwargs)
            finally:
                st.phase = "idle"
                st.prev_input.clear()

    def _check_cache(self, cache: Any) -> None:
        layers = getattr(cache, "layers", None)
        if layers is None:
            return
        for i in self.state.ratios:
            idx = getattr(self.state.adapter.text.attention(i), "layer_idx", i)
            if idx < len(layers) and type(layers[idx]).__name__ != "DynamicLayer":
                raise TypeError(
                    f"mmskip p-MoD keeps a per-layer number of tokens in the KV cache and needs DynamicCache "
                    f"layers; layer {idx} is a {type(layers[idx]).__name__}. Generate with the default cache "
                    "(no cache_implementation='static', no sliding-window layers)."
                )


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather ``t`` (b, L, ...) with b in {1, B} at positions ``idx`` (B, P) along dim 1."""
    B, P = idx.shape
    t = t.expand(B, *t.shape[1:])
    index = idx.view(B, P, *([1] * (t.dim() - 2))).expand(B, P, *t.shape[2:])
    return t.gather(1, index)


def _pack_mask(mask: Any, rows: torch.Tensor | None, cols: torch.Tensor) -> Any:
    """The attention mask restricted to query positions ``rows`` (None: keep all) and key
    positions ``cols``, both (B, n) index tensors."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"mmskip p-MoD supports the sdpa, eager and flash-attention masks (tensors), got {type(mask).__name__}; "
            "load the model with attn_implementation='sdpa' or 'eager'"
        )
    B = cols.shape[0]
    if mask.dim() == 2:  # flash attention: (batch, kv) padding mask
        return mask.expand(B, -1).gather(1, cols)
    if mask.dim() != 4:
        raise TypeError(f"mmskip p-MoD: unexpected attention mask of shape {tuple(mask.shape)}")
    m = mask.expand(B, *mask.shape[1:])
    hm, Lq = m.shape[1], m.shape[2]
    if rows is not None:
        m = m.gather(2, rows[:, None, :, None].expand(B, hm, rows.shape[1], m.shape[3]))
        Lq = rows.shape[1]
    return m.gather(3, cols[:, None, None, :].expand(B, hm, Lq, cols.shape[1]))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class MoDLayerHook(ModelHook):
    """One MoD decoder layer: packed prefill over kept tokens; decode against the kept cache."""

    def __init__(self, index: int, state: MoDState, handle: SkipHandle, scale: MlpScaleHook | None) -> None:
        super().__init__()
        self.index, self.state, self.handle, self.scale = index, state, handle, scale
        self.name = f"layer.{index}"
        self.names: list[str] | None = None

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        st = self.state
        if st.phase == "idle":  # called outside the multimodal model's forward: nothing known
            return self.fn_ref.original_forward(*args, **kwargs)
        if len(args) > 1 or not args:  # normalise to (hidden,) + keywords
            if self.names is None:
                self.names = list(inspect.signature(self.fn_ref.original_forward).parameters)
            kwargs = {**dict(zip(self.names, args)), **kwargs}
            args = (kwargs.pop(self.names[0]),)
        if st.phase == "decode":
            return self._decode(module, args[0], kwargs)
        if st.mode != "mod":
            return self.fn_ref.original_forward(*args, **kwargs)
        return self._prefill(module, args[0], kwargs)

    # -- prefill --------------------------------------------------------------------------
    def _prefill(self, layer: torch.nn.Module, h: torch.Tensor, kwargs: dict[str, Any]) -> Any:
        st, rec = self.state, self.state.records[self.index]
        B, L, D = h.shape
        vis = st.vision.to(h.device)  # layers may sit on another device than the ids (device_map)
        if vis.shape != (B, L):
            raise RuntimeError(f"mmskip p-MoD: layer input {tuple(h.shape)} does not match the prompt {tuple(vis.shape)}")
        n_vis = st.n_vision
        weight = None
        if st.pinned is not None:
            pin = st.pinned.get(self.index)
            pin = None if pin is None else pin.to(h.device)
            if pin is None or pin.shape[0] != B or pin.shape[1] > L:
                raise RuntimeError("mmskip p-MoD: the pinned routing does not match this batch; unpin_routing()")
            keep = (~vis).clone()
            keep[:, : pin.shape[1]] |= pin & vis[:, : pin.shape[1]]
            counts = keep.sum(1)
            if bool((counts != counts[0]).any()):
                raise RuntimeError("mmskip p-MoD: pinned routing keeps a different number of tokens per row")
            P = int(counts[0])
            idx = keep.nonzero()[:, 1].view(B, P)
            if self.state.config.signal == "router":
                weight = self._weight(self._score(layer, h, kwargs))
        else:
            keep_vis = [int(n * rec.ratio) for n in n_vis]  # p-MoD: k = trunc(n_vision * R_l)
            P = max(L - n + k for n, k in zip(n_vis, keep_vis))  # rows with fewer vision tokens keep more
            if P == L and self.state.config.signal != "router":  # nothing to skip in this batch
                idx = torch.arange(L, device=h.device).expand(B, L)
            else:
                score = self._score(layer, h, kwargs)
                if self.state.config.signal == "router":
                    weight = self._weight(score)
                idx = score.masked_fill(~vis, math.inf).topk(P, dim=1).indices.sort(dim=1).values
        gidx = idx.unsqueeze(-1).expand(B, P, D)
        rec.n_vision, rec.kept_vision = sum(n_vis), sum(P - L + n for n in n_vis)  # no device sync
        rec.tokens, rec.run = B * L, B * P
        rec.kept_idx = idx if P < L else None
        self.handle.counts.record(self.name, 0, B * (L - P))
        w_eff = None if weight is None else torch.where(vis, weight, torch.ones_like(weight))
        if P == L:
            return self._run(h, kwargs, w_eff)
        packed = dict(kwargs)
        cos, sin = kwargs["position_embeddings"]
        packed["position_embeddings"] = (_take(cos, idx), _take(sin, idx))
        if kwargs.get("position_ids") is not None:
            packed["position_ids"] = _take(kwargs["position_ids"], idx)
        packed["attention_mask"] = _pack_mask(kwargs.get("attention_mask"), idx, idx)
        out_p = self._run(h.gather(1, gidx), packed, None if w_eff is None else w_eff.gather(1, idx))
        base = h if w_eff is None else h * w_eff.unsqueeze(-1).to(h.dtype)  # STRing: skipped tokens -> w * h
        return base.scatter(1, gidx, out_p.to(base.dtype))

    def _run(self, h: torch.Tensor, kwargs: dict[str, Any], w: torch.Tensor | None) -> torch.Tensor:
        if self.scale is not None and w is not None:
            self.scale.scale = w.unsqueeze(-1).to(h.dtype)
        try:
            out = self.fn_ref.original_forward(h, **kwargs)
        finally:
            if self.scale is not None:
                self.scale.scale = None
        return out[0] if isinstance(out, tuple) else out

    def _weight(self, score: torch.Tensor) -> torch.Tensor:
        return self.state.config.tanh_scale * torch.tanh(score) + 1.0  # TanhNorm

    def _score(self, layer: torch.nn.Module, h: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        st = self.state
        signal = st.config.signal
        B, L, D = h.shape
        if signal == "router":
            st.signal_flops += 2.0 * D * B * L
            return st.routers.score(self.index, h)
        if signal == "norm":
            prev = st.prev_input.get(self.index - 1)
            if prev is None or prev.shape != h.shape:
                raise RuntimeError(f"mmskip p-MoD: layer {self.index - 1}'s input was not captured")
            st.signal_flops += 6.0 * D * B * L
            h32, p32 = h.float(), prev.float()
            return (h32 - p32).norm(dim=-1) / p32.norm(dim=-1).clamp_min(1e-6)
        return self._attention_score(layer, h, kwargs)

    def _attention_score(self, layer: torch.nn.Module, h: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """FastV's signal: softmax attention of each row's last prompt token over the keys,
        averaged over heads, from this layer's q/k projections (rotary applied)."""
        st = self.state
        attn = layer.self_attn
        B, L, D = h.shape
        hd = attn.head_dim
        last = st.last.to(h.device)
        x = layer.input_layernorm(h)
        xl = x.gather(1, last.view(B, 1, 1).expand(B, 1, D))
        q = attn.q_proj(xl).view(B, 1, -1, hd)
        k = attn.k_proj(x).view(B, L, -1, hd)
        if hasattr(attn, "q_norm") and hasattr(attn, "k_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2).float(), k.transpose(1, 2).float()
        cos, sin = kwargs["position_embeddings"]
        cos, sin = cos.expand(B, -1, -1).float(), sin.expand(B, -1, -1).float()
        at = last.view(B, 1, 1).expand(B, 1, cos.shape[-1])
        q = _rope(q, cos.gather(1, at)[:, None], sin.gather(1, at)[:, None])
        k = _rope(k, cos[:, None], sin[:, None]).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        logits = (q @ k.transpose(-1, -2)).squeeze(2) * attn.scaling  # (B, heads, L)
        valid = torch.arange(L, device=h.device)[None, :] <= last[:, None]
        if st.pad is not None and st.pad.shape == (B, L):
            valid = valid & st.pad.to(h.device)
        probs = logits.masked_fill(~valid[:, None, :], -math.inf).softmax(-1).mean(1)
        st.signal_flops += 2.0 * D * (attn.k_proj.out_features * B * L + attn.q_proj.out_features * B)
        return probs

    # -- decode ---------------------------------------------------------------------------
    def _decode(self, layer: torch.nn.Module, h: torch.Tensor, kwargs: dict[str, Any]) -> Any:
        st, rec = self.state, self.state.records[self.index]
        idx = rec.kept_idx if st.mode == "mod" else None
        idx = None if idx is None else idx.to(h.device)
        cache = get_cache(kwargs)
        if cache is not None and kwargs.get("use_cache", True) is not False and hasattr(cache, "layers"):
            li = getattr(layer.self_attn, "layer_idx", self.index)
            have = int(cache.layers[li].get_seq_length()) if li < len(cache.layers) else 0
            want = st.past - (0 if idx is None else st.prompt_len - idx.shape[1])
            if have != want or st.mode == "none":
                raise RuntimeError(
                    f"mmskip p-MoD: layer {self.index}'s KV cache holds {have} tokens, this application expects "
                    f"{want}; the cache was not built by this model's last p-MoD prefill (reset or another "
                    "generation ran since). Start a new generation."
                )
        if idx is None:
            return self.fn_ref.original_forward(h, **kwargs)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            total = mask.shape[-1]
            tail = torch.arange(st.prompt_len, total, device=idx.device).expand(idx.shape[0], -1)
            kwargs = {**kwargs, "attention_mask": _pack_mask(mask, None, torch.cat([idx, tail], dim=1))}
        return self.fn_ref.original_forward(h, **kwargs)
