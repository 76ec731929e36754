"""The SWIFT decoding loop (a transformers ``custom_generate`` decoding method) and its state.

``GenerationMixin.generate`` prepares everything (the generation config, with transformers' own
validation and errors; the logits processors and sampling warpers; the stopping criteria; the
KV cache, sliding-window layers included) and then calls :meth:`SwiftState.decode` in place of
its greedy / sampling loop (``mmskip.speculative.route`` wires it in). What the loop cannot serve
(:mod:`.fallback`) it refuses before any forward, and the route runs transformers' loop instead.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .._phase import cache_kwarg
from ..inject import CallGuard, SkipHandle, TechniqueState
from ..registry import DecoderAdapter
from . import cache as kv
from .acceptance import greedy_accept, speculative_accept
from .config import SelfSpeculativeConfig
from .draft import Draft
from .fallback import Fallback, decode_reason
from .search import LayerSetSearch

__all__ = ["SwiftState"]


@dataclass
class _Counters:
    calls: int = 0
    generated: int = 0
    rounds: int = 0  # verification forwards
    drafted: int = 0
    accepted: int = 0
    search_evals: int = 0
    search_seconds: float = 0.0
    draft_forwards: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    fallbacks: dict[str, int] = field(default_factory=dict)  # reason -> calls served by transformers' generate


class SwiftState(TechniqueState):
    """State of one applied SelfSpeculativeConfig: the draft, the layer set found, counters."""

    def __init__(self, config: SelfSpeculativeConfig, adapter: DecoderAdapter, handle: SkipHandle,
                 anchors: set[int]) -> None:
        self.config = config
        self.adapter = adapter
        self.handle = handle
        L = adapter.num_layers
        if config.fixed:
            self.units: list[tuple[str, int]] = []
            hooked = set(config.attn_skip or ()) | set(config.mlp_skip or ())
        else:
            self.units = [(kind, i) for i in range(1, L - 1) for kind in ("attn", "mlp")
                          if not (kind == "attn" and i in anchors)]
            hooked = set(range(1, L - 1))
        self.draft = Draft(adapter, handle, hooked)
        self.n_skip = min(len(self.units), max(1, round(config.skip_ratio * 2 * L)))
        self.layer_set: tuple[frozenset[int], frozenset[int]] | None = None
        self.score: float | None = None
        if config.fixed:
            self.layer_set = (frozenset(config.attn_skip or ()), frozenset(config.mlp_skip or ()))
            self.draft.set(*self.layer_set)
        self.counters = _Counters()
        self.guard = CallGuard(config.technique)
        self.warned: set[str] = set()  # fallback reasons already warned about (once per handle)

    # -- TechniqueState ----------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the found layer set (a fixed one stays); the next ``generate`` searches again."""
        self.reset_layer_set()

    def stats(self) -> dict[str, Any]:
        c = self.counters
        attn, mlp = self.layer_set or (frozenset(), frozenset())
        return {
            "layer_set": {"attn_skip": sorted(attn), "mlp_skip": sorted(mlp)},
            "matchness": self.score,
            "calls": c.calls,
            "generated_tokens": c.generated,
            "verify_forwards": c.rounds,
            "drafted_tokens": c.drafted,
            "accepted_tokens": c.accepted,
            "acceptance_rate": c.accepted / c.drafted if c.drafted else 0.0,
            "mean_accepted_length": c.accepted / c.rounds if c.rounds else 0.0,
            # tokens per verification forward (accepted drafts + 1); the prefill's token is not counted
            "tokens_per_verify": (c.generated - c.calls) / c.rounds if c.rounds else 0.0,
            "search_evals": c.search_evals,
            "search_seconds": c.search_seconds,
            "draft_forwards": c.draft_forwards,
            "draft_seconds": c.draft_seconds,  # wall time in draft forwards
            "verify_seconds": c.verify_seconds,  # wall time in verification forwards
            "fallback_calls": sum(c.fallbacks.values()),  # calls served by transformers' own generate
            "fallbacks": dict(c.fallbacks),
        }

    def fell_back(self, fallback: Fallback) -> None:
        """Count a call served by transformers' ``generate``; warn once per reason per handle."""
        self.counters.fallbacks[fallback.key] = self.counters.fallbacks.get(fallback.key, 0) + 1
        if fallback.key not in self.warned:
            self.warned.add(fallback.key)
            warnings.warn(f"{fallback.why}; falling back to transformers' generate (mmskip warns once per reason)",
                          UserWarning, stacklevel=3)

    def reset_layer_set(self) -> None:
        """Forget the found layer set; the next ``generate`` searches again."""
        if not self.config.fixed:
            self.layer_set, self.score = None, None

    # -- forwards -----------------------------------------------------------------------------------
    def _forward(self, model: torch.nn.Module, ids: torch.Tensor, cache: Any, mask: torch.Tensor | None,
                 pos: torch.Tensor, keep: int, draft: bool) -> torch.Tensor:
        kwargs = {cache_kwarg(model): cache}  # `cache` in transformers >= 5.2x, `past_key_values` before
        if draft:
            with self.draft.drafting():
                out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                            logits_to_keep=keep, **kwargs)
        else:
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                        logits_to_keep=keep, **kwargs)
        rows = ids.shape[1]
        st = self.handle.counts
        attn, mlp = self.draft.sets if draft else ((), ())
        for i in range(self.adapter.num_layers):
            st.record(f"attn.{i}", rows, rows if i in attn else 0)
            st.record(f"mlp.{i}", rows, rows if i in mlp else 0)
        st.fixed_units += keep if keep else rows
        return out.logits[0]

    @torch.no_grad()
    def _score(self, model: torch.nn.Module, window: torch.Tensor, target: torch.Tensor,
               sets: tuple[frozenset[int], frozenset[int]]) -> float:
        """Matchness: fraction of context positions where the draft's top-1 equals the full model's."""
        with self.draft.using(*sets):
            pred = model(input_ids=window, use_cache=False).logits[0].argmax(-1)
        return float((pred == target).float().mean())

    def _search(self, model: torch.nn.Module, search: LayerSetSearch, context: torch.Tensor, trials: int) -> None:
        t0 = time.perf_counter()
        window = context[:, -self.config.search_window:]
        with torch.no_grad():
            target = model(input_ids=window, use_cache=False).logits[0].argmax(-1)
        if search.y:  # the context grew: re-score the incumbent so the GP sees the current objective
            mask, _ = search.best()
            search.observe(mask, self._score(model, window, target, search.to_sets(mask)))
        for _ in range(trials):
            if len(search.y) >= self.config.search_trials:
                break
            mask = search.propose()
            search.observe(mask, self._score(model, window, target, search.to_sets(mask)))
            self.counters.search_evals += 1
        best, self.score = search.best()
        self.layer_set = search.to_sets(best)
        self.draft.set(*self.layer_set)
        self.counters.search_seconds += time.perf_counter() - t0

    # -- the custom_generate callable ---------------------------------------------------------------
    def decode(self, model: torch.nn.Module, input_ids: torch.Tensor, logits_processor: Any = None,
               stopping_criteria: Any = None, generation_config: GenerationConfig | None = None,
               streamer: Any = None, **model_kwargs: Any) -> Any:
        """Self-speculative decoding of one sequence; ``generate`` calls it with what it prepared.
        Raises :class:`Fallback` (before any forward) when SWIFT cannot serve the call."""
        gen = generation_config
        if model_kwargs.get("cache") is None and "past_key_values" in model_kwargs:  # older transformers' name
            model_kwargs["cache"] = model_kwargs.pop("past_key_values")
        reason = decode_reason(input_ids, gen, logits_processor, model_kwargs)
        if reason is not None:
            raise reason
        with self.guard.call(starts=True), torch.no_grad():
            if streamer is not None:  # generate() puts the prompt only into a streamer it was given itself
                streamer.put(input_ids.cpu())
            return self._decode(model, input_ids, logits_processor, stopping_criteria, gen, streamer, model_kwargs)

    def _decode(self, model: torch.nn.Module, input_ids: torch.Tensor, processor: Any, stopping: Any,
                gen: GenerationConfig, streamer: Any, model_kwargs: dict[str, Any]) -> Any:
        cfg, c = self.config, self.counters
        cache = model_kwargs["cache"]
        mask = model_kwargs.get("attention_mask")
        if mask is not None and bool(mask.all()):
            mask = None
        device = input_ids.device
        P = input_ids.shape[1]
        n_pad = 0 if mask is None else int((mask[0] == 0).sum())
        process = processor if processor is not None and len(processor) else None
        want_scores = gen.return_dict_in_generate and gen.output_scores
        want_logits = gen.return_dict_in_generate and gen.output_logits
        scores: list[torch.Tensor] = []
        raw: list[torch.Tensor] = []

        def positions(start: int, n: int) -> torch.Tensor:
            return torch.arange(start - n_pad, start - n_pad + n, device=device).unsqueeze(0)

        def mask_to(length: int) -> torch.Tensor | None:
            return None if mask is None else torch.cat([mask, mask.new_ones(1, length - mask.shape[1])], 1)

        def pick(prefix: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """(processed scores row, next token) as transformers' sampling / greedy loop picks it."""
            row = logits.float().unsqueeze(0)
            if process is not None:
                row = process(prefix, row)
            if gen.do_sample:
                return row, torch.multinomial(row.softmax(-1)[0], 1)
            return row, row[0].argmax(-1, keepdim=True)

        def stopped(ids: torch.Tensor) -> bool:
            """Checked after every token, given the scores so far (or None), as transformers' loop does."""
            return bool(stopping(ids, tuple(scores) if want_scores else None).any()) if stopping is not None else False

        c.calls += 1
        pos = model_kwargs.get("position_ids")
        pos = positions(0, P) if pos is None else pos
        logits = self._forward(model, input_ids, cache, mask, pos, 1, draft=False)
        kv.prepare(cache)
        row, nxt = pick(input_ids, logits[-1])
        scores.append(row)
        raw.append(logits[-1:].float())
        ids = torch.cat([input_ids, nxt.view(1, 1).to(input_ids.dtype)], 1)
        if streamer is not None:
            streamer.put(nxt.cpu())
        done = stopped(ids)
        search = None
        drafted0, accepted0 = c.drafted, c.accepted
        if not done and (self.layer_set is None or not cfg.reuse and not cfg.fixed and c.calls > 1):
            search = LayerSetSearch(self.units, self.n_skip, cfg.random_trials, cfg.seed + c.calls)
            self._search(model, search, input_ids, cfg.random_trials)
        if self.layer_set is not None:
            self.draft.set(*self.layer_set)

        while not done:
            T = ids.shape[1]
            n = T - 1  # tokens in the cache; ids[:, -1] is not yet
            budget = min(cfg.max_draft, gen.max_length - T - 1)
            q_rows: list[torch.Tensor] = []
            cur = ids
            t0 = time.perf_counter()
            while cur.shape[1] - T < budget:
                k = cur.shape[1] - T
                lg = self._forward(model, cur[:, -1:], cache, mask_to(T + k), positions(n + k, 1), 1, draft=True)
                row, tok = pick(cur, lg[-1])
                probs = row.softmax(-1)[0]
                if gen.do_sample:
                    q_rows.append(probs)
                cur = torch.cat([cur, tok.view(1, 1).to(cur.dtype)], 1)
                c.draft_forwards += 1
                if float(probs.max()) < cfg.confidence:
                    break  # the unconfident token is already paid for: proposed, and drafting stops
            c.draft_seconds += time.perf_counter() - t0
            k = cur.shape[1] - T
            kv.crop(cache, n)
            t0 = time.perf_counter()
            lg = self._forward(model, cur[:, n:], cache, mask_to(T + k), positions(n, k + 1), 0, draft=False)
            c.verify_seconds += time.perf_counter() - t0
            rows = lg.float()
            if process is not None:
                rows = torch.cat([process(cur[:, : T + i], rows[i : i + 1]) for i in range(k + 1)])
            drafts = cur[0, T:]
            if gen.do_sample:
                q = torch.stack(q_rows) if q_rows else rows.new_zeros(0, rows.shape[-1])
                m, bonus = speculative_accept(rows.softmax(-1), q, drafts)
            else:
                m, bonus = greedy_accept(rows, drafts)
            c.rounds += 1
            c.drafted += k
            c.accepted += m
            new = [*drafts[:m].tolist(), bonus]
            added = 0
            for t in new:
                ids = torch.cat([ids, ids.new_tensor([[t]])], 1)
                scores.append(rows[added : added + 1])
                raw.append(lg[added : added + 1].float())
                added += 1
                if stopped(ids):
                    done = True
                    break
            kv.crop(cache, n + added)
            if streamer is not None:
                streamer.put(ids[0, T:].cpu())
            if not done and search is not None and len(search.y) < cfg.search_trials \
                    and (self.score or 0.0) < cfg.target_score:
                self._search(model, search, ids, cfg.trials_per_round)
        if streamer is not None:
            streamer.end()
        c.generated += ids.shape[1] - P
        drafted = c.drafted - drafted0
        if drafted and (c.accepted - accepted0) / drafted < cfg.reoptimize_below:
            self.reset_layer_set()
        if gen.return_dict_in_generate:
            return GenerateDecoderOnlyOutput(
                sequences=ids,
                scores=tuple(scores) if want_scores else None,
                logits=tuple(raw) if want_logits else None,
                **{_OUTPUT_CACHE: cache},
            )
        return ids



_OUTPUT_CACHE = "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"
