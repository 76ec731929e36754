"""MuE's decoder hooks: exits per generated token and the KV rule.

``DecoderHook`` on the decoder opens a :class:`DecoderPass` per forward (the threshold at each
position, pinned or replayed exits) and records its exits; ``DecoderLayerHook`` runs, skips (only
computing the exited tokens' K/V for the cache, through the adapter) or runs densely and keeps the
exited tokens' state, then decides who exits.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from diffusers.hooks import ModelHook

from mmskip._phase import ArgumentsHook, get_cache
from mmskip.inject import CallGuard, SkipHandle

from .state import NEVER, DecoderPass, MuEState, cosine, decoder_done, guarded, one_token_exits

__all__ = ["DecoderHook", "DecoderLayerHook", "own_wrapper_code", "run_eagerly"]


class DecoderHook(ArgumentsHook):
    """On the decoder: opens a :class:`DecoderPass` per forward and records its exits."""

    def __init__(self, state: MuEState, handle: SkipHandle, guard: CallGuard, measures: bool = True) -> None:
        super().__init__()
        self.state, self.handle, self.guard = state, handle, guard
        # False: no threshold can trigger, so no layer hook is attached and this hook counts the layers
        self.measures = measures
        L = state.adapter.num_decoder_layers
        self.names = [n for i in range(L) for n in (f"decoder.{i}", f"decoder.{i}.kv")]

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.measures and torch.compiler.is_compiling():
            return run_eagerly(self.new_forward, module, *args, **kwargs)  # one break: exits decided eagerly
        bound = self.arguments(args, kwargs)
        x = bound.get("inputs_embeds")
        x = bound.get("input_ids") if x is None else x
        if x is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        cache = get_cache(bound)
        past = int(cache.get_seq_length()) if cache is not None else 0
        if not self.measures:
            return self._counted(x, past, args, kwargs)
        st = self.state
        no_cache = cache is None or bound.get("use_cache") is False
        # only generate(use_cache=False) replays (a per-thread lookup: kept out of cached, compiled steps)
        gen = st.generations.current() if no_cache else None
        with guarded(self.guard, starts=past == 0):
            # generate(use_cache=False) recomputes every position at each step: earlier ones replay their exits
            replay = gen.decisions if gen is not None and gen.forwards > 0 and no_cache else None
            st.dec = self._open(int(x.shape[0]), int(x.shape[1]), past, x.device, replay)
            try:
                out = self.fn_ref.original_forward(*args, **kwargs)
            except BaseException:
                st.dec = None
                raise
            p, st.dec = st.dec, None
            p.settle()
            decoder_done(st, p.exit_layer, p.past, p.dense, measured=True)
            if gen is not None:
                gen.forwards += 1
                gen.decisions = p.exit_layer if no_cache else None
            return out

    def _open(self, B: int, q: int, past: int, dev: torch.device, replay: torch.Tensor | None) -> DecoderPass:
        st = self.state
        L = st.adapter.num_decoder_layers
        pinned, measure_from = st.pinned_decoder, 0
        if pinned is None and replay is not None and replay.shape[0] == B and replay.shape[1] < q:
            measure_from = replay.shape[1]
            pinned = torch.cat([replay.to(dev), replay.new_full((B, q - measure_from), -1, device=dev)], dim=1)
        elif pinned is not None:
            measure_from = q
            self._check_pin(B, q, past)
            pinned = pinned[:, past: past + q].to(dev)
        thr, active = st.decoder_thresholds(past, q, dev)
        single = B * q == 1 and pinned is None
        return DecoderPass(
            layers=L, batch=B, q=q, past=past, done=torch.zeros(B, q, dtype=torch.bool, device=dev),
            exit_layer=torch.full((B, q), L, dtype=torch.long, device=dev), thr=thr,
            measure=L > 1 and active, pinned=pinned, measure_from=measure_from, single=single,
            single_thr=st.thr_values[past] if single else NEVER,
        )

    def _check_pin(self, B: int, q: int, past: int) -> None:
        pinned = self.state.pinned_decoder
        if pinned is not None and (pinned.shape[0] != B or pinned.shape[1] < past + q):
            raise ValueError(
                f"mmskip MuE: pinned decoder exits cover {pinned.shape[0]} rows x {pinned.shape[1]} positions; this "
                f"forward needs {B} rows x positions {past}..{past + q - 1}. unpin_exits() or stay within them"
            )

    def _counted(self, x: torch.Tensor, past: int, args: tuple, kwargs: dict) -> Any:
        """No exit can trigger: the plain decoder, every token counted through every layer, and the
        generation's exits kept as a shape (every entry the depth) instead of a tensor per step."""
        st = self.state
        B, q = int(x.shape[0]), int(x.shape[1])
        self._check_pin(B, q, past)
        out = self.fn_ref.original_forward(*args, **kwargs)
        self.handle.counts.record_each(self.names, B * q)
        decoder_done(st, x, past, 0, measured=False)
        return out


@torch.compiler.disable(recursive=True)
def run_eagerly(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, run eagerly when a compiled graph calls it: one graph break there,
    instead of one per exit decision deep inside it (a measured encoder pass or decoder forward).

    A decision (a host read, then Python control flow over the layers) inside a compiled forward
    breaks the graph, and dynamo then compiles every frame of the call chain above it on its own
    (transformers' forward wrappers, the hooks, each deciding layer): on ``digits-florence``, 29
    graphs from 88 frames for 8 prompts, whose guards cost more than the skipped layers save, and
    whose variants overflow dynamo's recompile limit for the frames that share a code object
    (dynamo then runs them eagerly).
    Run eagerly, the pass decides exactly as it does without ``torch.compile``."""
    return fn(*args, **kwargs)


def own_wrapper_code(module: torch.nn.Module, tag: str) -> None:
    """Give the forward wrapper diffusers' hook registry put on ``module`` a code object of its own.

    Every hooked module's wrapper shares one code object; under ``torch.compile`` the wrappers on a
    graph break's call chain (the decoder and the model around it, see :func:`run_eagerly`) become
    compiled frames, and their variants together can overflow dynamo's recompile limit for that one
    code object, which then runs every module below it eagerly. The wrapper is diffusers'
    per-registration closure, dropped on ``remove()``: the module itself is not touched."""
    fn = getattr(module.forward, "func", None)
    if isinstance(fn, types.FunctionType) and not fn.__code__.co_name.endswith(tag):
        fn.__code__ = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{tag}")


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
        if p.single:
            return self._single(p, h, args, kwargs)
        i, n = self.index, p.batch * p.q
        kv_skipped = rest_skipped = 0
        if not bool(p.done.any()):
            out = self.fn_ref.original_forward(*args, **kwargs)
        elif bool(p.done.all()):
            adapter = self.state.adapter
            cache = adapter.decoder_layer_cache(args, kwargs)
            if cache is not None:
                adapter.append_self_kv(i, cache, h, args, kwargs)
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

    def _single(self, p: DecoderPass, h: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        """One token (batch-1 decoding), nothing pinned: the same decisions as the masked path with
        one Python int for the exit and one host read per layer (the cosine test) instead of the
        mask bookkeeping. An exited token skips the whole layer call (only its K/V are appended)."""
        i, st = self.index, self.state
        if p.exit_at:
            cache = st.adapter.decoder_layer_cache(args, kwargs)
            if cache is not None:
                st.adapter.append_self_kv(i, cache, h, args, kwargs)
            self.handle.counts.record(f"decoder.{i}", 1, 1)
            self.handle.counts.record(f"decoder.{i}.kv", 1, 0 if cache is not None else 1)
            return h
        out = self.fn_ref.original_forward(*args, **kwargs)
        self.handle.counts.record(f"decoder.{i}", 1, 0)
        self.handle.counts.record(f"decoder.{i}.kv", 1, 0)
        if p.measure and st.min_layers <= i + 1 < p.layers and one_token_exits(h, out, p.single_thr):
            p.exit_at = i + 1
        return out
