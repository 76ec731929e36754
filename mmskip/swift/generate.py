"""The SWIFT decoding loop: a transformers ``custom_generate`` decoding method over a :class:`SwiftState`.

``GenerationMixin.generate`` prepares everything (the generation config, with transformers' own
validation and errors; the logits processors and sampling warpers; the stopping criteria; the
KV cache, sliding-window layers included) and then calls :func:`decode` in place of
its greedy / sampling loop (``mmskip.swift.route`` wires it in). What the loop cannot serve
(:mod:`.fallback`) it refuses before any forward, and the route runs transformers' loop instead.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers import GenerationConfig
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .._phase import cache_kwarg
from . import cache as kv
from .acceptance import greedy_accept, speculative_accept
from .fallback import decode_reason
from .lookup import lookup_draft
from .search import LayerSetSearch

if TYPE_CHECKING:
    from .state import SwiftState

__all__ = ["decode"]


def _forward(state: SwiftState, model: torch.nn.Module, ids: torch.Tensor, cache: Any, mask: torch.Tensor | None,
             pos: torch.Tensor, keep: int, draft: bool) -> torch.Tensor:
    kwargs = {cache_kwarg(model): cache}  # `cache` in transformers >= 5.2x, `past_key_values` before
    _dynamic_lengths(ids, mask, pos, cache)
    if draft:
        with state.draft.drafting():
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                        logits_to_keep=keep, **kwargs)
    else:
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                    logits_to_keep=keep, **kwargs)
    rows = ids.shape[1]
    st = state.handle.counts
    attn, mlp = state.draft.sets if draft else ((), ())
    for i in range(state.adapter.num_layers):
        st.record(f"attn.{i}", rows, rows if i in attn else 0)
        st.record(f"mlp.{i}", rows, rows if i in mlp else 0)
    st.fixed_units += keep if keep else rows
    return out.logits[0]

def _dynamic_lengths(ids: torch.Tensor, mask: torch.Tensor | None, pos: torch.Tensor, cache: Any) -> None:
    """Tell ``torch.compile`` (a compiled ``model.forward``) that sequence and cache lengths vary:
    prompts, verifications of 2..max_draft + 1 tokens and every cache length then share one graph
    instead of compiling one per length the first time it appears (a hint only: length 1, the
    draft step, keeps its own graph)."""
    for t in (ids, mask, pos):
        if t is not None:
            torch._dynamo.maybe_mark_dynamic(t, 1)
    for layer in kv.full_layers(cache):
        torch._dynamo.maybe_mark_dynamic(layer.keys, 2)
        torch._dynamo.maybe_mark_dynamic(layer.values, 2)


@torch.no_grad()
def _score(state: SwiftState, model: torch.nn.Module, window: torch.Tensor, target: torch.Tensor,
           sets: tuple[frozenset[int], frozenset[int]]) -> float:
    """Matchness: fraction of context positions where the draft's top-1 equals the full model's."""
    with state.draft.using(*sets):
        pred = model(input_ids=window, use_cache=False).logits[0].argmax(-1)
    return float((pred == target).float().mean())

def _search(state: SwiftState, model: torch.nn.Module, search: LayerSetSearch, context: torch.Tensor, trials: int) -> None:
    t0 = time.perf_counter()
    window = context[:, -state.config.search_window:]
    with torch.no_grad():
        target = model(input_ids=window, use_cache=False).logits[0].argmax(-1)
    if search.y:  # the context grew: re-score the incumbent so the GP sees the current objective
        mask, _ = search.best()
        search.observe(mask, _score(state, model, window, target, search.to_sets(mask)))
    for _ in range(trials):
        if len(search.y) >= state.config.search_trials:
            break
        mask = search.propose()
        search.observe(mask, _score(state, model, window, target, search.to_sets(mask)))
        state.counters.search_evals += 1
    best, state.score = search.best()
    state.layer_set = search.to_sets(best)
    state.draft.set(*state.layer_set)
    state.counters.search_seconds += time.perf_counter() - t0

def decode(state: SwiftState, model: torch.nn.Module, input_ids: torch.Tensor, logits_processor: Any = None,
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
    with state.guard.call(starts=True), torch.no_grad():
        if streamer is not None:  # generate() puts the prompt only into a streamer it was given itself
            streamer.put(input_ids.cpu())
        return _decode(state, model, input_ids, logits_processor, stopping_criteria, gen, streamer, model_kwargs)

def _decode(state: SwiftState, model: torch.nn.Module, input_ids: torch.Tensor, processor: Any, stopping: Any,
            gen: GenerationConfig, streamer: Any, model_kwargs: dict[str, Any]) -> Any:
    cfg, c = state.config, state.counters
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
    logits = _forward(state, model, input_ids, cache, mask, pos, 1, draft=False)
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
    if not done and (state.layer_set is None or not cfg.reuse and not cfg.fixed and c.calls > 1):
        search = LayerSetSearch(state.units, state.n_skip, cfg.random_trials, cfg.seed + c.calls)
        _search(state, model, search, input_ids, cfg.random_trials)
    if state.layer_set is not None:
        state.draft.set(*state.layer_set)

    while not done:
        T = ids.shape[1]
        n = T - 1  # tokens in the cache; ids[:, -1] is not yet
        budget = min(cfg.max_draft, gen.max_length - T - 1)
        q_rows: list[torch.Tensor] = []
        cur = ids
        t0 = time.perf_counter()
        looked = _look_up(cfg, ids, budget)
        if looked:  # a point-mass proposal for each token: speculative sampling stays exact
            cur = torch.cat([ids, ids.new_tensor([looked])], 1)
            if gen.do_sample:
                q_rows = list(F.one_hot(torch.tensor(looked, device=device), logits.shape[-1]).float())
            c.lookup_rounds += 1
        while not looked and cur.shape[1] - T < budget:
            k = cur.shape[1] - T
            lg = _forward(state, model, cur[:, -1:], cache, mask_to(T + k), positions(n + k, 1), 1, draft=True)
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
        lg = _forward(state, model, cur[:, n:], cache, mask_to(T + k), positions(n, k + 1), 0, draft=False)
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
        if looked:
            c.lookup_drafted += k
            c.lookup_accepted += m
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
                and (state.score or 0.0) < cfg.target_score:
            _search(state, model, search, ids, cfg.trials_per_round)
    if streamer is not None:
        streamer.end()
    c.generated += ids.shape[1] - P
    drafted = c.drafted - drafted0
    if drafted and (c.accepted - accepted0) / drafted < cfg.reoptimize_below:
        state.reset_layer_set()
    if gen.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(
            sequences=ids,
            scores=tuple(scores) if want_scores else None,
            logits=tuple(raw) if want_logits else None,
            **{_OUTPUT_CACHE: cache},
        )
    return ids


def _look_up(cfg: Any, ids: torch.Tensor, budget: int) -> list[int]:
    """The prompt-lookup draft of this round (``[]``: none configured, no room, or no match)."""
    if cfg.prompt_lookup is None or budget < 1:
        return []
    return lookup_draft(ids[0].cpu().numpy(), *cfg.prompt_lookup, budget)


_OUTPUT_CACHE = "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"
