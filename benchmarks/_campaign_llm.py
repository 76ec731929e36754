"""The LLM section of ``gpu_campaign.py``: decoding on a Llama-3-8B-shaped model with random weights.

Llama-3-8B's widths (hidden 4096, 32 heads, 8 KV heads, intermediate 14336, vocab 128256) with
``--llm-layers`` of its 32 layers (stated on every row), bf16 on CUDA, batch sizes ``--llm-batches``.
Rows: each hook technique (unified s=2 / 1.5, void layers, FFN-SkipLLM default and forced 25 %) eager
against plain eager (``mmskip.timing.paired`` through ``llm_layer_skip.decode_call``: decode =
``generate(N) - generate(1)``) and compiled against compiled plain as ``overhead.py --compile`` times it (``_compiled_pairs``: static cache,
plain and each config on a deep copy of its own with a compiled ``forward``, ``--llm-compile-mode`` on CUDA
(default ``reduce-overhead``: CUDA graphs); every graph compiled before the paired, interleaved rounds, the
graphs compiled inside them counted; one config copy at a time beside the plain one); at batch 1 also SWIFT
(layer set searched in an untimed warm-up, then reused) and transformers' early-exit self-speculation
(``assistant_early_exit``), both eager on the dynamic cache, which is what they run on. FLOPs bound
= 1 / the decode FLOPs fraction (``handle.counts.flops()`` of generate(N) - generate(1), as ``llm_compiled.py``;
SWIFT: ``handle.stats()["flops_fraction"]`` of the whole call; early exit: none, it is not an mmskip handle).
Compiles dominate the time (tens of seconds each at this width), so :func:`plan` runs first what the
issue's goals need (compiled unified skipping at batch 1, every technique eager at batch 1 with its
host-sync check, compiled unified skipping at batch 8) and a time limit cuts the rest.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from typing import Any

import harness
import torch
from _campaign_rows import Context, host_sync, timing_fields
from _compiled_pairs import compiled_copy, graphs_compiled, static_batch
from device_check import _paired_on_copy
from llm_layer_skip import decode_call

import mmskip
from mmskip import schedules

__all__ = ["run"]

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=224, num_attention_heads=4, num_key_value_heads=2)


def build(ctx: Context, layers: int) -> tuple[torch.nn.Module, str]:
    """The model (random weights, built on the device in its dtype) and its shape in words."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = TINY if ctx.smoke else LLAMA3_8B
    cfg = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=2048, rope_theta=500000.0, pad_token_id=0,
                      bos_token_id=None, eos_token_id=None, **dims)
    torch.manual_seed(0)
    with ctx.device:
        model = LlamaForCausalLM._from_config(cfg, dtype=ctx.dtype).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, None
    name = "tiny Llama" if ctx.smoke else "Llama-3-8B-shaped"
    return model, f"{name}, {layers} of {32 if not ctx.smoke else layers} layers, d={dims['hidden_size']}"


def compile_mode(ctx: Context) -> str | None:
    """``torch.compile``'s mode: CUDA graphs on CUDA (what transformers' compiled decoding uses), default on CPU."""
    return ctx.args.llm_compile_mode if ctx.device.type == "cuda" else None


def hook_configs() -> dict[str, mmskip.SkipConfig]:
    """The techniques that run inside plain ``generate`` (eager and compiled), most important first."""
    return {
        "unified s=2": mmskip.LayerSkipConfig(schedule=schedules.unified(2.0)),
        "unified s=1.5": mmskip.LayerSkipConfig(schedule=schedules.unified(1.5)),
        "void layers": mmskip.VoidLayerConfig(),
        "FFN-SkipLLM (default)": mmskip.FFNSkipConfig(),
        "FFN-SkipLLM 25% (forced)": mmskip.FFNSkipConfig(schedule=schedules.adaptive(-1.0, "cosine", warmup=0,
                                                                                      max_skip=0.25)),
    }


@torch.no_grad()
def decode_fraction(model: torch.nn.Module, ids: torch.Tensor, config: mmskip.SkipConfig, n: int) -> float:
    """Decode FLOPs fraction of one eager ``generate``: (n tokens - 1 token) counted by the handle."""
    with mmskip.applied(model, config) as h:
        kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
        h.reset_stats()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        s1, f1 = h.counts.flops()
        h.reset_stats()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        sn, fn = h.counts.flops()
    return (sn - s1) / (fn - f1) if fn > f1 else 1.0


def _sync(model: torch.nn.Module, ids: torch.Tensor, config: mmskip.SkipConfig | None, ctx: Context) -> str:
    """Host syncs of one forward over the prompt with ``config`` applied (an untimed call)."""
    if config is None:
        return host_sync(lambda: model(input_ids=ids), ctx.device)
    with mmskip.applied(model, config):
        return host_sync(lambda: model(input_ids=ids), ctx.device)


class _Rows:
    """One row at a time, in any order: prompts and compiled baselines are made once per batch size."""

    def __init__(self, ctx: Context, model: torch.nn.Module, shape: str) -> None:
        self.ctx, self.model, self.shape, self.n = ctx, model, shape, ctx.args.llm_new_tokens
        self.ids: dict[int, torch.Tensor] = {}
        self.plain: torch.nn.Module | None = None  # the compiled copy of the plain model, kept for every batch size
        self.warmed: set[int] = set()  # batch sizes the plain copy is compiled for
        self.compile_s = 10.0  # what the next compile is expected to cost (the last plain compile's warm-up)

    def prompt(self, batch: int) -> torch.Tensor:
        if batch not in self.ids:
            g = torch.Generator().manual_seed(batch)
            ids = torch.randint(3, self.model.config.vocab_size, (batch, self.ctx.args.llm_prompt), generator=g)
            self.ids[batch] = ids.to(self.ctx.device)
        return self.ids[batch]

    def eager(self, batch: int, name: str) -> None:
        ctx, model, ids, n = self.ctx, self.model, self.prompt(batch), self.n
        if name == "plain":
            ctx.attempt(self.shape, "plain", batch, "eager", lambda: {"host_sync": _sync(model, ids, None, ctx)})
            return
        cfg, mask = hook_configs()[name], torch.ones_like(ids)

        def measure() -> dict[str, Any]:
            t = harness.paired(decode_call(model, ids, mask, n, None), {"c": decode_call(model, ids, mask, n, cfg)},
                               repeats=ctx.repeats)["c"]
            frac = decode_fraction(model, ids, cfg, n)
            return {**timing_fields(t), "flops_bound": 1 / frac, "bound_warning": t.bound_warning(frac),
                    "host_sync": _sync(model, ids, cfg, ctx)}

        ctx.attempt(self.shape, name, batch, "eager", measure, need_s=5.0)

    def _decode(self, model: torch.nn.Module, batch: int) -> harness.Candidate:
        """Decode alone on a static cache: ``generate(N) - generate(1)``."""
        ids, n = self.prompt(batch), self.n
        return harness.Candidate(lambda: static_batch(model, ids, n), minus=lambda: static_batch(model, ids, 1))

    def _warm(self, model: torch.nn.Module, batch: int) -> float:
        """Compile every graph of ``model`` at this batch size (prefill, decode; CUDA graphs record on a later
        call): seconds of the first call."""
        first = harness.once(self._decode(model, batch))[0]
        harness.once(self._decode(model, batch))
        return first

    def compiled(self, batch: int, name: str) -> None:
        """Compiled decoding (``_compiled_pairs``, as ``overhead.py --compile``): a compiled deep copy of the plain
        model, kept, against one compiled deep copy per config (made, warmed, timed in paired interleaved rounds
        with the warm-up round dropped, then freed)."""
        ctx, n, mode = self.ctx, self.n, compile_mode(self.ctx)
        if name == "plain":
            def plain() -> dict[str, Any]:
                if self.plain is None:
                    self.plain = compiled_copy(self.model, (), "plain", ctx.args.llm_backend, mode)[0]
                self.compile_s = self._warm(self.plain, batch)
                self.warmed.add(batch)
                t = harness.repeated(self._decode(self.plain, batch), repeats=ctx.repeats, warmup=0)
                return {"tokens_per_s": batch * (n - 1) / statistics.median(t), "compile_warmup_s": self.compile_s,
                        "compile_mode": mode or "default", "cache": "static",
                        "host_sync": "see the eager row (same model, untimed forward)"}

            ctx.attempt(self.shape, "plain", batch, "compiled", plain, need_s=1.2 * self.compile_s)
            return
        if self.plain is None or batch not in self.warmed:
            ctx.row(self.shape, name, batch, "compiled", skipped="no compiled plain run at this batch size")
            return

        def measure() -> dict[str, Any]:
            cfg = hook_configs()[name]
            fast, handles = compiled_copy(self.model, (cfg,), name, ctx.args.llm_backend, mode)
            try:
                warm = self._warm(fast, batch)
                self._warm(self.plain, batch)  # the plain copy's graphs are current again
                graphs = graphs_compiled()
                t = harness.paired(self._decode(self.plain, batch), {"c": self._decode(fast, batch)},
                                   repeats=ctx.repeats, warmup=1)["c"]
                in_rounds = graphs_compiled() - graphs
                ids = self.prompt(batch)
                agree = float((static_batch(fast, ids, n) == static_batch(self.plain, ids, n)).float().mean())
            finally:
                while handles:  # no name left bound to a handle: a handle refers to its model
                    handles.pop().remove()
                del fast
                gc.collect()  # the compiled forward refers to its copy: a cycle
                if ctx.device.type == "cuda":
                    torch.cuda.empty_cache()
            frac = decode_fraction(self.model, self.prompt(batch), cfg, n)
            return {**timing_fields(t), "flops_bound": 1 / frac, "bound_warning": t.bound_warning(frac),
                    "compile_warmup_s": warm, "compile_mode": mode or "default", "cache": "static",
                    "graphs_in_timed_rounds": in_rounds, "agreement_with_plain": agree,
                    "host_sync": "see the eager row (same hooks, untimed forward)"}

        ctx.attempt(self.shape, name, batch, "compiled", measure, need_s=1.5 * self.compile_s)

    def speculative(self, batch: int, name: str = "") -> None:
        if batch != 1:
            self.ctx.row(self.shape, "SWIFT / early exit", batch, "eager",
                         skipped="batch 1 only: SWIFT serves batch size 1 (larger batches fall back to plain "
                                 "decoding) and transformers' assisted generation is batch 1")
            return
        _speculative_rows(self.ctx, self.model, self.shape, self.prompt(batch), self.n)


def plan(batches: list[int], smoke: bool) -> list[tuple[str, int, str]]:
    """(kind, batch, technique) in the order they run: what the issue's goals need first (compiled unified
    skipping at the first batch size, every technique eager there with its host-sync check, compiled
    unified skipping at the second), so a time limit cuts the rest."""
    core = ("plain", "unified s=2", "unified s=1.5")
    other = tuple(c for c in hook_configs() if c not in core)
    comp = batches[:1] if smoke else batches  # the smoke run compiles at its first batch size only
    steps = [("compiled", b, c) for b in comp[:1] for c in core]
    steps += [("eager", b, c) for b in batches[:1] for c in ("plain", *hook_configs())]  # cheap: every sync check
    steps += [("compiled", b, c) for b in comp[1:2] for c in core]
    steps += [("speculative", b, "") for b in batches[:1]]
    steps += [("compiled", b, c) for b in comp[:1] for c in other]
    steps += [("compiled", b, c) for b in comp[2:] for c in core]
    steps += [("eager", b, c) for b in batches[1:] for c in ("plain", *hook_configs())]
    steps += [("compiled", b, c) for b in comp[1:] for c in other]
    return steps + [("speculative", b, "") for b in batches[1:]]


def _speculative_rows(ctx: Context, model: torch.nn.Module, shape: str, ids: torch.Tensor, n: int) -> None:
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(ids))

    def gen(m: torch.nn.Module) -> torch.Tensor:
        return m.generate(ids, **kw)[:, ids.shape[1]:]

    def swift() -> dict[str, Any]:
        config: mmskip.SkipConfig = mmskip.SelfSpeculativeConfig(skip_ratio=0.45)
        with torch.no_grad(), mmskip.applied(model, config) as h:
            gen(model)  # untimed warm-up: the layer-set search runs here
            found = h.stats().get("layer_set")
        if found:  # timed with the layer set it found (set reuse), not the search
            config = dataclasses.replace(config, attn_skip=tuple(found["attn_skip"]),
                                         mlp_skip=tuple(found["mlp_skip"]))
        t, plain_out, out, stats = _paired_on_copy(model, config, torch.no_grad()(gen), ctx.repeats)
        frac = stats.get("flops_fraction")
        return {**timing_fields(t), "flops_bound": 1 / frac if frac else None, "identical": bool(torch.equal(plain_out, out)),
                "acceptance": stats.get("acceptance_rate"), "layer_set": found,
                "host_sync": "not checked (speculative decoding syncs once per draft round by design)"}

    def early_exit() -> dict[str, Any]:
        k = max(1, model.config.num_hidden_layers // 2)
        got: dict[str, torch.Tensor] = {}

        def plain() -> None:
            got["p"] = gen(model)

        def early() -> None:
            got["e"] = torch.no_grad()(lambda: model.generate(ids, assistant_early_exit=k, **kw))()[:, ids.shape[1]:]

        t = harness.paired(torch.no_grad()(plain), {"e": early}, repeats=ctx.repeats)["e"]
        return {**timing_fields(t), "flops_bound": None, "exit_layer": k, "identical": bool(torch.equal(got["p"], got["e"])),
                "host_sync": "not checked (speculative decoding syncs once per draft round by design)",
                "note": "transformers' assistant_early_exit (no mmskip handle, no FLOPs count)"}

    ctx.attempt(shape, "SWIFT r=0.45", ids.shape[0], "eager", swift, need_s=15.0)
    ctx.attempt(shape, "early exit k=L/2", ids.shape[0], "eager", early_exit, need_s=10.0)


def run(ctx: Context) -> None:
    """Every row of :func:`plan` for ``--llm-batches``, as long as the section's time lasts."""
    a = ctx.args
    t0 = time.time()
    model, shape = build(ctx, a.llm_layers)
    print(f"[llm] {shape}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params, built in "
          f"{time.time() - t0:.1f} s", flush=True)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    rows = _Rows(ctx, model, shape)
    for kind, batch, name in plan(list(a.llm_batches), ctx.smoke):
        getattr(rows, kind)(batch, name)
