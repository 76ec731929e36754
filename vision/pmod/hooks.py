"""The hooks of p-MoD (:mod:`mmskip.vision.pmod`): routing, packing and the per-layer KV rule.

``InputHook`` on the module that receives ``input_ids`` tells prefill from decode, records where
the vision tokens are and holds the concurrency guard; ``MoDLayerHook`` runs a MoD layer on the
packed kept tokens (prefill) or against the layer's own kept cache (decode); ``MlpScaleHook``
applies the router weight to the MLP output (STRing); ``CaptureHook`` keeps a layer's input for
the ``"norm"`` signal of the next layer. :func:`attach_mod` puts them on a model
(``mmskip.apply`` calls it through the config).
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import TYPE_CHECKING, Any

import torch
from diffusers.hooks import ModelHook

from mmskip._phase import ArgumentsHook, HeadCounter, get_cache
from mmskip.inject import CallGuard, SkipHandle
from mmskip.registry import get_adapter

from ..adapters import VLMAdapter
from ..generation_replay import bind_generations
from .config import mod_layers
from .packing import group_sizes, pack_mask, rope, select_kept, take
from .routers import MoDRouters
from .state import LayerRecord, MoDState

if TYPE_CHECKING:
    from .config import MoDConfig

__all__ = ["InputHook", "MoDLayerHook", "MlpScaleHook", "CaptureHook", "attach_mod"]

logger = logging.getLogger("mmskip.vision.pmod")


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


class InputHook(ArgumentsHook):
    """On the module that receives ``input_ids``: prefill vs decode, the routed tokens, the guard.

    A forward with routed (vision) tokens is a *prefill chunk*: the first forward of a
    generation, or a later one that appends a video clip to the cache (streaming). A forward
    without routed tokens that continues a cache is a *decode* step (any length)."""

    def __init__(self, state: MoDState, handle: SkipHandle) -> None:
        super().__init__()
        self.state, self.handle = state, handle
        self.guard = CallGuard(handle.config.technique)
        self.names = [f"layer.{i}" for i in range(state.adapter.num_layers)]

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not self.state.ratios:  # no MoD layer (every keep ratio 1.0): nothing to route, only counts
            return self._counted(args, kwargs)
        bound = self.arguments(args, kwargs)
        cache = bound.get("cache", bound.get("past_key_values"))
        past = int(cache.get_seq_length()) if cache is not None else 0
        st = self.state
        gen = st.generations.current()
        no_cache = cache is None or bound.get("use_cache") is False
        routed, groups = self._routed(bound)
        if past == 0 and cache is not None:
            self._check_cache(cache)
        if past > 0 and st.mode != "none" and routed.shape[0] != st.batch:
            raise ValueError(
                f"mmskip p-MoD: this forward has batch {routed.shape[0]} but the prefill had {st.batch}"
            )
        has_routed = bool(routed.any())
        with self.guard.call(starts=past == 0):  # refuses a second thread before any state changes
            B, q = routed.shape
            if past == 0 or has_routed:
                self._prefill_chunk(past, B, q, has_routed)
                st.phase = "prefill"
                st.vision, st.groups = routed, groups
                st.group_sizes = group_sizes(groups) if has_routed else [[] for _ in range(B)]
                pad = bound.get("attention_mask")
                st.pad = pad[:, -q:].bool() if isinstance(pad, torch.Tensor) and pad.dim() == 2 else None
                if st.pad is not None:
                    st.last = (q - 1) - st.pad.flip(1).to(torch.int64).argmax(1)
                else:
                    st.last = torch.full((B,), q - 1, dtype=torch.long, device=routed.device)
            else:
                st.phase = "decode"
            st.past, st.q = past, q
            self.handle.counts.record_each(self.names, B * q)
            # generate(use_cache=False): each step recomputes the prompt; it replays the first forward's routing
            recompute = gen is not None and gen.forwards > 0 and no_cache
            st.replay = st.pinned if st.pinned is not None else gen.decisions if recompute else None
            try:
                out = self.fn_ref.original_forward(*args, **kwargs)
            finally:
                st.phase, st.replay = "idle", None
                st.prev_input.clear()
            if gen is not None:
                if gen.forwards == 0 and no_cache and st.mode == "mod":
                    gen.decisions = {i: st.kept_vision_mask(i) for i in st.records}
                gen.forwards += 1
            return out

    def _prefill_chunk(self, past: int, B: int, q: int, has_routed: bool) -> None:
        """A forward that starts a prompt (``past == 0``) or appends routed tokens to it: the mode
        and token counts of ``stats()``."""
        st = self.state
        if past == 0:
            st.reset()
            st.batch = B
            st.mode = "plain"
            if not has_routed and not st.warned_plain:
                st.warned_plain = True
                what = "video frames" if st.config.routing == "frames" else "vision tokens"
                logger.warning("mmskip %s: a prompt with no %s: the plain model runs (nothing to skip); "
                               "stats()['mode'] == 'plain' (expected for a VideoStream's text prefix)", st.config.technique, what)
        st.mode = "mod" if has_routed or st.mode == "mod" else "plain"
        st.tokens += B * q

    def _counted(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        """The plain forward of a config with no MoD layer, keeping the stats a routed one keeps (mode,
        tokens, per-layer counts): no routing groups, no padding or last-token reads, no guard (no
        state a second thread could mix) and no routing to replay."""
        bound = self.arguments(args, kwargs)
        cache = bound.get("cache", bound.get("past_key_values"))
        past = int(cache.get_seq_length()) if cache is not None else 0
        st = self.state
        frames = st.config.routing == "frames"  # a frame's tokens are video tokens (frame_groups checks the layout)
        routed = st.adapter.vision_mask(bound.get("input_ids"), bound.get("inputs_embeds"), video_only=frames)
        B, q = routed.shape
        has_routed = bool(routed.any())
        if past == 0 or has_routed:
            self._prefill_chunk(past, B, q, has_routed)
        st.past, st.q = past, q
        self.handle.counts.record_each(self.names, B * q)
        return self.fn_ref.original_forward(*args, **kwargs)

    def _routed(self, bound: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens MoD routes ((batch, seq) bool) and their routing groups ((batch, seq) long,
        -1 = always runs): every vision token in one group per row (p-MoD), or each video frame's
        tokens in a group of their own (VideoLLM-MoD)."""
        st = self.state
        ids, embeds = bound.get("input_ids"), bound.get("inputs_embeds")
        if st.config.routing == "frames":
            video = st.adapter.vision_mask(ids, embeds, video_only=True)
            groups = st.adapter.frame_groups(bound, video)
            return groups >= 0, groups
        vision = st.adapter.vision_mask(ids, embeds)
        return vision, torch.where(vision, 0, -1)

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
        self._check_cache(module, kwargs)
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
        n_vis = [sum(sizes) for sizes in st.group_sizes]
        weight = None
        if st.replay is not None:
            pin = st.replay.get(self.index)
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
            # p-MoD: k = trunc(n * R_l) per group (all of a row's vision tokens, or one video frame)
            kept = [L - sum(sizes) + sum(int(n * rec.ratio) for n in sizes) for sizes in st.group_sizes]
            P = max(kept)  # rows that keep fewer fill up with their best remaining tokens
            if P == L and self.state.config.signal != "router":  # nothing to skip in this batch
                idx = torch.arange(L, device=h.device).expand(B, L)
            else:
                score = self._score(layer, h, kwargs)
                if self.state.config.signal == "router":
                    weight = self._weight(score)
                idx = select_kept(score, st.groups.to(h.device), rec.ratio, P)
        gidx = idx.unsqueeze(-1).expand(B, P, D)
        rec.n_vision += sum(n_vis)
        rec.kept_vision += sum(P - L + n for n in n_vis)  # no device sync
        rec.tokens += B * L
        rec.run += B * P
        rec.kept_idx = idx if P < L else None
        self.handle.counts.record(self.name, 0, B * (L - P))
        w_eff = None if weight is None else torch.where(vis, weight, torch.ones_like(weight))
        if P == L:
            out = self._run(h, {**kwargs, "attention_mask": self._mask(kwargs, None, h.device)}, w_eff)
            return out
        packed = dict(kwargs)
        cos, sin = kwargs["position_embeddings"]
        packed["position_embeddings"] = (take(cos, idx), take(sin, idx))
        if kwargs.get("position_ids") is not None:
            packed["position_ids"] = take(kwargs["position_ids"], idx)
        packed["attention_mask"] = self._mask(kwargs, idx, h.device)
        out_p = self._run(h.gather(1, gidx), packed, None if w_eff is None else w_eff.gather(1, idx))
        # the layer's cache now holds the positions it held before plus this chunk's kept ones
        rec.cols = torch.cat([self._held(B, h.device), st.past + idx], dim=1)
        rec.tail_from = st.past + L
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
        q = rope(q, cos.gather(1, at)[:, None], sin.gather(1, at)[:, None])
        k = rope(k, cos[:, None], sin[:, None]).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        logits = (q @ k.transpose(-1, -2)).squeeze(2) * attn.scaling  # (B, heads, L)
        valid = torch.arange(L, device=h.device)[None, :] <= last[:, None]
        if st.pad is not None and st.pad.shape == (B, L):
            valid = valid & st.pad.to(h.device)
        probs = logits.masked_fill(~valid[:, None, :], -math.inf).softmax(-1).mean(1)
        st.signal_flops += 2.0 * D * (attn.k_proj.out_features * B * L + attn.q_proj.out_features * B)
        return probs

    # -- the layer's own cache --------------------------------------------------------------
    def _held(self, B: int, device: torch.device) -> torch.Tensor:
        """(B, C) absolute positions this layer's KV cache holds before the current forward."""
        rec, past = self.state.records[self.index], self.state.past
        tail = torch.arange(rec.tail_from, past, device=device).expand(B, -1)
        if rec.cols is None:
            return tail
        return torch.cat([rec.cols.to(device), tail], dim=1)

    def _mask(self, kwargs: dict[str, Any], rows: torch.Tensor | None, device: torch.device) -> Any:
        """The attention mask for this layer's queries (``rows`` of the chunk, None: all) over
        the keys it has: the cached positions it kept plus this forward's queries."""
        st, rec = self.state, self.state.records[self.index]
        mask = kwargs.get("attention_mask")
        if rec.cols is None and rows is None:
            return mask  # the layer holds every position: the model's mask fits as it is
        B = st.batch
        new = rows if rows is not None else torch.arange(st.q, device=device).expand(B, st.q)
        if mask is None:
            if st.past == 0 or new.shape[1] == 1:
                return None  # causal over the packed order (it keeps positions in order) is right
            raise RuntimeError(
                "mmskip p-MoD: a multi-token forward that continues a cache came without an attention mask; "
                "use attn_implementation='sdpa' or 'eager' (transformers builds the mask then)"
            )
        return pack_mask(mask, rows, torch.cat([self._held(B, device), st.past + new.to(device)], dim=1))

    def _check_cache(self, layer: torch.nn.Module, kwargs: dict[str, Any]) -> None:
        st, rec = self.state, self.state.records[self.index]
        cache = get_cache(kwargs)
        if st.past == 0 or cache is None or kwargs.get("use_cache", True) is False or not hasattr(cache, "layers"):
            return
        li = getattr(layer.self_attn, "layer_idx", self.index)
        have = int(cache.layers[li].get_seq_length()) if li < len(cache.layers) else 0
        want = (rec.tail_from if rec.cols is None else rec.cols.shape[1]) + st.past - rec.tail_from
        if have != want or st.mode == "none":
            raise RuntimeError(
                f"mmskip p-MoD: layer {self.index}'s KV cache holds {have} tokens, this application expects "
                f"{want}; the cache was not built by this model's last p-MoD prefill (reset or another "
                "generation ran since). Start a new generation."
            )

    # -- decode ---------------------------------------------------------------------------
    def _decode(self, layer: torch.nn.Module, h: torch.Tensor, kwargs: dict[str, Any]) -> Any:
        if self.state.records[self.index].cols is None:
            return self.fn_ref.original_forward(h, **kwargs)
        return self.fn_ref.original_forward(h, **{**kwargs, "attention_mask": self._mask(kwargs, None, h.device)})


def attach_mod(config: MoDConfig, model: torch.nn.Module, handle: SkipHandle) -> None:
    """Attach p-MoD (or VideoLLM-MoD) to ``model``: the input hook, one layer hook per MoD layer (plus
    the router-scaled MLP or the ``"norm"`` capture), the head counter; ``handle.state`` = a new
    :class:`MoDState`. Called by ``mmskip.apply(model, config)``."""
    adapter: VLMAdapter = get_adapter(model, "vlm")
    if config.routing == "frames" and not adapter.takes_video:
        raise ValueError(
            f"{type(config).__name__} routes video frames, and {type(model).__name__} takes images only; use "
            "mmskip.vision.MoDConfig (p-MoD) for images, or a video model (LlavaOnevision, Qwen2-VL, Qwen2.5-VL)"
        )
    ratios = mod_layers(config, adapter.num_layers, type(model).__name__)
    routers = None
    if config.signal == "router":
        routers = MoDRouters.load(config.routers)
        routers.check(model, sorted(ratios))
        ref = next(model.parameters())
        routers.to(device=ref.device, dtype=ref.dtype)
    state = MoDState(config=config, adapter=adapter, ratios=ratios, routers=routers)
    text = adapter.text
    state.costs = [text.layer_flops(i) for i in range(text.num_layers)]
    handle.counts.cost.update({f"layer.{i}": c for i, c in enumerate(state.costs)})
    handle.counts.declare([f"layer.{i}" for i in range(text.num_layers)], next(model.parameters()).device)
    if adapter.head is not None:
        handle.counts.fixed_cost = text._linear_flops(adapter.head)
        handle.add_hook(adapter.head, HeadCounter(handle), ".head")
    handle.add_hook(adapter.mm_model, InputHook(state, handle), ".input")
    if ratios:  # generate(use_cache=False) replays its routing (with no MoD layer there is none)
        bind_generations(handle, model, state.generations)
    for i, ratio in sorted(ratios.items()):
        layer = text.layers[i]
        scale = None
        if config.signal == "router":
            scale = MlpScaleHook()
            handle.add_hook(text.mlp(i), scale, ".mlp_scale")
        state.records[i] = LayerRecord(ratio=ratio)
        handle.add_hook(layer, MoDLayerHook(i, state, handle, scale), ".layer")
    if config.signal == "norm":
        for i in sorted({i - 1 for i in ratios}):
            handle.add_hook(text.layers[i], CaptureHook(i, state), ".capture")
    handle.state = state
    logger.debug("%s: MoD layers %s, signal %s", config.technique, ratios, config.signal)
