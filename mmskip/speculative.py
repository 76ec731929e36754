"""SWIFT: on-the-fly self-speculative decoding (Xia et al., 2024).

The model drafts with a subset of its own attention and MLP sublayers skipped, then verifies
the drafted tokens with the full model in one forward: no extra model, no training.

- **Layer-set search on the fly** (SWIFT's context-based layer-set optimisation): the skipped
  sublayers are chosen during the first tokens of a generation, by random search followed by
  Bayesian optimisation (a Gaussian process over the binary sublayer mask, expected
  improvement) of the *matchness*: how often the draft's top-1 token equals the full model's
  on the context (prompt + generated tokens so far, teacher-forced in one forward).
- **Confidence-aware drafting**: drafting stops when the draft's top-1 probability falls below
  ``confidence`` (or after ``max_draft`` tokens). The unconfident token itself is still
  proposed: its draft forward is already paid for and verifying one more token is nearly free.
- **Reuse**: the layer set found in one call is kept on the handle and reused by later calls;
  a call whose acceptance rate falls below ``reoptimize_below`` makes the next call search again
  (SWIFT re-optimises when the input distribution shifts).
- **Lossless**: greedy output is the full model's greedy output token for token; sampling uses
  the speculative-sampling acceptance rule (Leviathan et al., 2023; Chen et al., 2023), so the
  sampled tokens follow the full model's distribution.
- **KV cache**: one ``DynamicCache``. Past tokens always hold the full model's K/V; the draft
  reads them and appends its own K/V for drafted tokens at the layers whose attention it runs.
  Before verification the cache is cut back to the verified length, the full model writes the
  K/V of the drafted tokens at every layer, and after acceptance the rejected tail is cut off;
  accepted tokens are never recomputed.

Use it as every mmskip technique: ``mmskip.apply(model, SelfSpeculativeConfig())`` then the
usual ``model.generate(...)`` (batch size 1, greedy or sampling); ``handle.remove()`` restores
the model's own ``generate``.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers.hooks import ModelHook
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .inject import SkipConfig, SkipHandle, TechniqueState
from .registry import DecoderAdapter, get_adapter

__all__ = ["SelfSpeculativeConfig", "speculative_accept", "greedy_accept"]


# -- acceptance rules ---------------------------------------------------------------------------


def greedy_accept(target_logits: torch.Tensor, draft_tokens: torch.Tensor) -> tuple[int, int]:
    """Greedy verification. ``target_logits``: (k + 1, V) full-model logits at the positions that
    predict the k drafted tokens and the one after; returns (drafts accepted, next token)."""
    target = target_logits.argmax(-1)
    k = int(draft_tokens.numel())
    mismatch = (target[:k] != draft_tokens).nonzero()
    m = int(mismatch[0]) if len(mismatch) else k
    return m, int(target[m])


def speculative_accept(
    p: torch.Tensor, q: torch.Tensor, draft_tokens: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[int, int]:
    """Speculative-sampling acceptance rule (Leviathan et al., 2023; Chen et al., 2023).

    ``p``: (k + 1, V) target probabilities, ``q``: (k, V) the draft probabilities the k
    ``draft_tokens`` were sampled from. Drafted token i is accepted with probability
    ``min(1, p_i(x) / q_i(x))``; at the first rejection the next token is sampled from
    ``norm(max(0, p_i - q_i))``; if all are accepted it is sampled from ``p_k``. The returned
    tokens are distributed exactly as samples from ``p``. Returns (accepted, next token).
    """
    k = int(draft_tokens.numel())
    if p.shape[0] != k + 1 or q.shape[0] != k:
        raise ValueError(f"expected p of {k + 1} rows and q of {k} rows for {k} drafts, got {p.shape[0]}, {q.shape[0]}")
    idx = torch.arange(k, device=p.device)
    px, qx = p[idx, draft_tokens], q[idx, draft_tokens]
    u = torch.rand(k, generator=generator, device=p.device) if k else px
    # accept when u < p/q, i.e. u * q < p (q(x) > 0 since x was sampled from q)
    rejected = (u * qx >= px).nonzero()
    if len(rejected) == 0:
        return k, int(torch.multinomial(p[k], 1, generator=generator))
    m = int(rejected[0])
    residual = (p[m] - q[m]).clamp(min=0)
    total = residual.sum()
    residual = residual / total if total > 0 else p[m]
    return m, int(torch.multinomial(residual, 1, generator=generator))


# -- sampling warpers (the subset of transformers' warpers the loop supports) --------------------


def _probs(logits: torch.Tensor, gen: GenerationConfig) -> torch.Tensor:
    """Softmax of ``logits`` (rows) after temperature, top-k and top-p, as transformers applies them."""
    x = logits.float()
    if gen.temperature is not None and gen.temperature != 1.0:
        x = x / gen.temperature
    if gen.top_k is not None and 0 < gen.top_k < x.shape[-1]:
        kth = torch.topk(x, gen.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, -math.inf)
    if gen.top_p is not None and gen.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True, dim=-1)
        cum = sorted_x.softmax(-1).cumsum(-1)
        drop = cum - sorted_x.softmax(-1) >= gen.top_p  # keep the smallest prefix reaching top_p
        drop[..., 0] = False
        x = x.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    return x.softmax(-1)


# -- the draft: sublayers skipped for the duration of a draft forward ----------------------------


_MISSING = object()


@dataclass
class _Draft:
    """What the draft skips now. ``drafting()`` swaps the skipped modules' instance ``forward``
    for the duration of one draft forward and restores it in ``finally``: verification
    forwards run the untouched model, with no per-module hook overhead."""

    adapter: DecoderAdapter
    attn: frozenset[int] = frozenset()
    mlp: frozenset[int] = frozenset()
    both: frozenset[int] = frozenset()  # layers whose two sublayers are skipped: the whole layer is

    def set(self, attn: frozenset[int], mlp: frozenset[int]) -> None:
        self.attn, self.mlp, self.both = frozenset(attn), frozenset(mlp), frozenset(attn) & frozenset(mlp)

    @contextmanager
    def drafting(self) -> Iterator[None]:
        a = self.adapter
        swaps = [(a.layers[i], self._skip_layer) for i in self.both]
        swaps += [(a.attention(i), _zero_attention) for i in self.attn - self.both]
        swaps += [(a.mlp(i), _zero_mlp) for i in self.mlp - self.both]
        saved = []
        try:
            for module, fn in swaps:
                saved.append((module, module.__dict__.get("forward", _MISSING)))
                module.forward = fn
            yield
        finally:
            for module, old in reversed(saved):
                if old is _MISSING:
                    del module.__dict__["forward"]
                else:
                    module.forward = old

    def _skip_layer(self, *args: Any, **kwargs: Any) -> Any:
        # a skipped layer passes the residual on and writes no KV: drafting never reads its cache
        return self.adapter.skip_output(args[0] if args else kwargs["hidden_states"])


def _zero_attention(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    h = args[0] if args else kwargs["hidden_states"]
    return torch.zeros_like(h), None


def _zero_mlp(*args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.zeros_like(args[0] if args else next(iter(kwargs.values())))


class _GenerateHook(ModelHook):
    """Routes the model's ``generate`` through SWIFT while applied; restores it on removal."""

    def __init__(self, runner: _Swift) -> None:
        super().__init__()
        self.runner = runner
        self._had_own = False
        self._own: Any = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._had_own = "generate" in module.__dict__
        self._own = module.__dict__.get("generate")
        module.generate = functools.partial(self.runner.generate, module)
        return module

    def deinitalize_hook(self, module: torch.nn.Module) -> torch.nn.Module:  # (sic: diffusers' name)
        if self._had_own:
            module.generate = self._own
        else:
            module.__dict__.pop("generate", None)
        return module


# -- layer-set search: random search + Bayesian optimisation -----------------------------------


class _LayerSetSearch:
    """SWIFT's layer-set optimisation over a binary mask of ``n_skip`` skipped candidate sublayers.

    The first ``random_trials`` masks are uniform random; after that each trial fits a Gaussian
    process (kernel ``exp(-4 * hamming / D)``, small noise) to the observed matchness scores and
    evaluates the candidate with the largest expected improvement among random masks and
    single swaps of the best masks seen.
    """

    def __init__(self, units: list[tuple[str, int]], n_skip: int, random_trials: int, seed: int) -> None:
        self.units = units
        self.n_skip = n_skip
        self.random_trials = random_trials
        self.gen = torch.Generator().manual_seed(seed)
        self.X: list[torch.Tensor] = []
        self.y: list[float] = []

    @property
    def D(self) -> int:
        return len(self.units)

    def _random(self, n: int) -> torch.Tensor:
        order = torch.rand(n, self.D, generator=self.gen).argsort(-1)[:, : self.n_skip]
        return torch.zeros(n, self.D).scatter_(1, order, 1.0)

    def _swaps(self, mask: torch.Tensor, n: int) -> torch.Tensor:
        on, off = mask.nonzero().flatten(), (mask == 0).nonzero().flatten()
        if len(on) == 0 or len(off) == 0:
            return mask.unsqueeze(0)
        a = on[torch.randint(len(on), (n,), generator=self.gen)]
        b = off[torch.randint(len(off), (n,), generator=self.gen)]
        out = mask.repeat(n, 1)
        rows = torch.arange(n)
        out[rows, a], out[rows, b] = 0.0, 1.0
        return out

    def propose(self) -> torch.Tensor:
        if len(self.y) < self.random_trials:
            return self._random(1)[0]
        X, y = torch.stack(self.X), torch.tensor(self.y)
        mu, sd = y.mean(), y.std().clamp(min=1e-6)
        ys = (y - mu) / sd
        best = torch.tensor(self.y).argsort(descending=True)[:3]
        pool = torch.cat([self._random(128)] + [self._swaps(self.X[int(i)], 64) for i in best])
        pool = torch.unique(pool, dim=0)
        seen = {tuple(x.tolist()) for x in self.X}
        pool = torch.stack([p for p in pool if tuple(p.tolist()) not in seen] or [self._random(1)[0]])

        def kern(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.exp(-4.0 * torch.cdist(a, b, p=1) / self.D)

        K = kern(X, X) + 1e-2 * torch.eye(len(X))
        chol = torch.linalg.cholesky(K)
        ks = kern(pool, X)
        alpha = torch.cholesky_solve(ys.unsqueeze(1), chol).squeeze(1)
        mean = ks @ alpha
        v = torch.cholesky_solve(ks.T, chol)
        var = (1.0 - (ks * v.T).sum(1)).clamp(min=1e-9)
        s = var.sqrt()
        z = (mean - ys.max() - 0.01) / s
        normal = torch.distributions.Normal(0.0, 1.0)
        ei = (mean - ys.max() - 0.01) * normal.cdf(z) + s * normal.log_prob(z).exp()
        return pool[int(ei.argmax())]

    def observe(self, mask: torch.Tensor, score: float) -> None:
        self.X.append(mask)
        self.y.append(score)

    def best(self) -> tuple[torch.Tensor, float]:
        i = max(range(len(self.y)), key=self.y.__getitem__)
        return self.X[i], self.y[i]

    def to_sets(self, mask: torch.Tensor) -> tuple[frozenset[int], frozenset[int]]:
        chosen = [self.units[int(j)] for j in mask.nonzero().flatten()]
        return (frozenset(i for kind, i in chosen if kind == "attn"), frozenset(i for kind, i in chosen if kind == "mlp"))


# -- the config ---------------------------------------------------------------------------------


_SUPPORTED_KWARGS = {
    "input_ids", "attention_mask", "generation_config", "max_new_tokens", "max_length", "do_sample",
    "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id", "return_dict_in_generate", "use_cache",
    "bos_token_id",
}


@dataclass(frozen=True)
class SelfSpeculativeConfig(SkipConfig):
    """SWIFT self-speculative decoding: the model drafts with sublayers skipped, then verifies.

    ``skip_ratio``: fraction of the model's 2L attention + MLP sublayers the draft skips
    (SWIFT's r; chosen among layers 1..L-2, the first and last layer always run).
    ``attn_skip`` / ``mlp_skip``: a fixed draft layer set (e.g. ``handle.stats()["layer_set"]``
    of an earlier run); when either is given no search runs.
    ``max_draft``: most tokens drafted per verification. ``confidence``: drafting stops when the
    draft's top-1 probability falls below it (SWIFT's confidence-aware drafting; 0 disables).
    ``search_trials``: layer sets evaluated in all (the first ``random_trials`` at random, the
    rest by Bayesian optimisation), ``trials_per_round`` of them after each verification,
    until one reaches matchness ``target_score``. ``search_window``: context tokens (the most
    recent) scored per trial. ``reuse``: keep the best layer set for later ``generate`` calls;
    ``reoptimize_below``: forget it after a call whose acceptance rate is below this (0: never).
    """

    technique: ClassVar[str] = "self_speculative"
    skip_ratio: float = 0.45
    attn_skip: tuple[int, ...] | None = None
    mlp_skip: tuple[int, ...] | None = None
    max_draft: int = 10
    confidence: float = 0.6
    search_trials: int = 24
    random_trials: int = 8
    trials_per_round: int = 2
    target_score: float = 0.95
    search_window: int = 64
    reuse: bool = True
    reoptimize_below: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.skip_ratio < 1.0:
            raise ValueError(f"SelfSpeculativeConfig.skip_ratio must lie in (0, 1), got {self.skip_ratio}")
        if self.max_draft < 1:
            raise ValueError(f"SelfSpeculativeConfig.max_draft must be >= 1, got {self.max_draft}")
        if not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"SelfSpeculativeConfig.confidence must lie in [0, 1], got {self.confidence}")
        if self.search_trials < 1 or self.random_trials < 1 or self.trials_per_round < 1:
            raise ValueError("search_trials, random_trials and trials_per_round must be >= 1")
        if not 0.0 <= self.reoptimize_below <= 1.0:
            raise ValueError(f"SelfSpeculativeConfig.reoptimize_below must lie in [0, 1], got {self.reoptimize_below}")
        if self.search_window < 2:
            raise ValueError(f"SelfSpeculativeConfig.search_window must be >= 2, got {self.search_window}")
        for name in ("attn_skip", "mlp_skip"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(int(i) for i in value))

    @property
    def fixed(self) -> bool:
        return self.attn_skip is not None or self.mlp_skip is not None

    def _attach(self, model: torch.nn.Module, handle: SkipHandle) -> None:
        adapter = get_adapter(model, "decoder")
        L = adapter.num_layers
        if self.fixed:
            attn, mlp = set(self.attn_skip or ()), set(self.mlp_skip or ())
            bad = sorted(i for i in attn | mlp if not 0 <= i < L)
            if bad:
                raise ValueError(f"SelfSpeculativeConfig skips layers {bad}, but the model has {L} layers (0..{L - 1})")
            if 0 in attn:
                raise ValueError("the draft must run layer 0's attention: its KV length is the cache length")
        elif L < 3:
            raise ValueError(f"SWIFT searches layers 1..L-2; a {L}-layer model has none to skip")
        runner = _Swift(self, adapter, handle)
        handle.counts.cost.update({f"attn.{i}": adapter.attn_flops(i) for i in range(L)})
        handle.counts.cost.update({f"mlp.{i}": adapter.mlp_flops(i) for i in range(L)})
        handle.counts.fixed_cost = adapter.head_flops()
        handle.add_hook(adapter.model, _GenerateHook(runner), ".generate")
        handle.state = runner


# -- the decoding loop --------------------------------------------------------------------------


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


class _Swift(TechniqueState):
    """State of one applied SelfSpeculativeConfig: the draft, the layer set, counters."""

    def __init__(self, config: SelfSpeculativeConfig, adapter: DecoderAdapter, handle: SkipHandle) -> None:
        self.config = config
        self.adapter = adapter
        self.handle = handle
        self.draft = _Draft(adapter)
        L = adapter.num_layers
        self.units = [(kind, i) for i in range(1, L - 1) for kind in ("attn", "mlp")]
        self.n_skip = min(len(self.units), max(1, round(config.skip_ratio * 2 * L)))
        self.layer_set: tuple[frozenset[int], frozenset[int]] | None = None
        self.score: float | None = None
        if config.fixed:
            self.layer_set = (frozenset(config.attn_skip or ()), frozenset(config.mlp_skip or ()))
        self.counters = _Counters()

    # -- public-ish ---------------------------------------------------------------------------
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
        }

    def reset_layer_set(self) -> None:
        """Forget the found layer set; the next ``generate`` searches again."""
        if not self.config.fixed:
            self.layer_set, self.score = None, None

    # -- helpers --------------------------------------------------------------------------------
    def _forward(self, model: torch.nn.Module, ids: torch.Tensor, cache: Any, mask: torch.Tensor | None,
                 start: int, keep: int, draft: bool) -> torch.Tensor:
        pos = torch.arange(start, start + ids.shape[1], device=ids.device).unsqueeze(0)
        if mask is not None:
            pos = pos - int((mask[0] == 0).sum())
        with self.draft.drafting() if draft else nullcontext():
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                        logits_to_keep=keep)
        rows = ids.shape[1]
        st = self.handle.counts
        for i in range(self.adapter.num_layers):
            st.record(f"attn.{i}", rows, rows if draft and i in self.draft.attn else 0)
            st.record(f"mlp.{i}", rows, rows if draft and i in self.draft.mlp else 0)
        st.fixed_units += keep if keep else rows
        return out.logits[0]

    @torch.no_grad()
    def _score(self, model: torch.nn.Module, window: torch.Tensor, target: torch.Tensor,
               sets: tuple[frozenset[int], frozenset[int]]) -> float:
        """Matchness: fraction of context positions where the draft's top-1 equals the full model's."""
        saved = (self.draft.attn, self.draft.mlp)
        self.draft.set(*sets)
        try:
            with self.draft.drafting():
                pred = model(input_ids=window, use_cache=False).logits[0].argmax(-1)
        finally:
            self.draft.set(*saved)
        return float((pred == target).float().mean())

    def _search(self, model: torch.nn.Module, search: _LayerSetSearch, context: torch.Tensor, trials: int) -> None:
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

    def _generation_config(self, model: torch.nn.Module, kwargs: dict[str, Any]) -> GenerationConfig:
        unknown = sorted(set(kwargs) - _SUPPORTED_KWARGS)
        if unknown:
            raise ValueError(
                f"SelfSpeculativeConfig's generate does not support {unknown}; it supports "
                f"{sorted(_SUPPORTED_KWARGS)}. Remove the handle to use the model's own generate for these."
            )
        # resolved as transformers' generate does: given config, then the model's, then global defaults
        gen = copy.deepcopy(kwargs.pop("generation_config", None) or model.generation_config)
        gen.update(**model.generation_config.to_dict(), defaults_only=True, allow_custom_entries=True)
        gen.update(**gen._get_default_generation_params(), defaults_only=True)
        gen.update(**{k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask")})
        unsupported = {
            "num_beams": (gen.num_beams or 1) != 1,
            "num_return_sequences": (gen.num_return_sequences or 1) != 1,
            "repetition_penalty": (gen.repetition_penalty or 1.0) != 1.0,
            "no_repeat_ngram_size": bool(gen.no_repeat_ngram_size),
            "min_new_tokens": bool(gen.min_new_tokens) or bool(gen.min_length),
            "bad_words_ids": bool(gen.bad_words_ids),
            "typical_p": gen.typical_p is not None and gen.typical_p != 1.0,
            "min_p": bool(gen.min_p),
            "epsilon_cutoff": bool(gen.epsilon_cutoff),
            "eta_cutoff": bool(gen.eta_cutoff),
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"SelfSpeculativeConfig's generate does not support {bad} (set in the generation config)")
        if gen.use_cache is False:
            raise ValueError("self-speculative decoding needs the KV cache (use_cache=False was given)")
        return gen

    # -- the loop -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, model: torch.nn.Module, input_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """Self-speculative ``generate`` (batch size 1): greedy or sampling, lossless."""
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("generate needs input_ids of shape (1, prompt_length)")
        if input_ids.shape[0] != 1:
            raise ValueError(
                f"SelfSpeculativeConfig decodes one sequence at a time (batch size 1, like transformers' assisted "
                f"generation); got a batch of {input_ids.shape[0]}. Loop over the prompts."
            )
        mask = kwargs.get("attention_mask")
        gen = self._generation_config(model, dict(kwargs))
        if mask is not None and bool(mask.all()):
            mask = None
        if mask is not None and bool((mask[0, 1:] < mask[0, :-1]).any()):
            raise ValueError("attention_mask must be left padding (zeros before the prompt) or all ones")
        P = input_ids.shape[1]
        max_new = gen.max_new_tokens if gen.max_new_tokens is not None else max(0, (gen.max_length or 20) - P)
        eos = gen.eos_token_id
        eos = set() if eos is None else {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}
        cfg, c = self.config, self.counters
        c.calls += 1
        if max_new <= 0:
            return GenerateDecoderOnlyOutput(sequences=input_ids) if gen.return_dict_in_generate else input_ids

        cache = DynamicCache(config=model.config)
        logits = self._forward(model, input_ids, cache, mask, 0, 1, draft=False)
        if gen.do_sample:
            nxt = int(torch.multinomial(_probs(logits[-1:], gen)[0], 1))
        else:
            nxt = int(logits[-1].argmax())
        tokens = [nxt]
        search = None
        drafted0, accepted0 = c.drafted, c.accepted
        if self.layer_set is None or not cfg.reuse and not cfg.fixed and c.calls > 1:
            search = _LayerSetSearch(self.units, self.n_skip, cfg.random_trials, cfg.seed + c.calls)
            self._search(model, search, input_ids, cfg.random_trials)
        self.draft.set(*self.layer_set)

        device = input_ids.device
        while len(tokens) < max_new and tokens[-1] not in eos:
            n = P + len(tokens) - 1  # tokens in the cache; tokens[-1] is not yet
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(1, n + 1 - mask.shape[1])], 1)
            budget = min(cfg.max_draft, max_new - len(tokens) - 1)
            drafts: list[int] = []
            q_rows: list[torch.Tensor] = []
            cur = tokens[-1]
            while len(drafts) < budget:
                dmask = None if mask is None else torch.cat([mask, mask.new_ones(1, len(drafts))], 1)
                t0 = time.perf_counter()
                lg = self._forward(model, torch.tensor([[cur]], device=device), cache, dmask, n + len(drafts), 1, True)
                c.draft_seconds += time.perf_counter() - t0
                c.draft_forwards += 1
                if gen.do_sample:
                    q = _probs(lg, gen)[0]
                    confident = float(q.max()) >= cfg.confidence
                    cur = int(torch.multinomial(q, 1))
                    q_rows.append(q)
                else:
                    top = lg[0].float().softmax(-1).max(-1)
                    confident = float(top.values) >= cfg.confidence
                    cur = int(top.indices)
                drafts.append(cur)  # already paid for: proposed even when unconfident, drafting stops after it
                if not confident:
                    break
            _crop(cache, n)
            ids = torch.tensor([[tokens[-1], *drafts]], device=device)
            vmask = None if mask is None else torch.cat([mask, mask.new_ones(1, len(drafts))], 1)
            t0 = time.perf_counter()
            lg = self._forward(model, ids, cache, vmask, n, 0, draft=False)
            c.verify_seconds += time.perf_counter() - t0
            d = torch.tensor(drafts, dtype=torch.long, device=device)
            if gen.do_sample:
                q = torch.stack(q_rows) if q_rows else lg.new_zeros(0, lg.shape[-1])
                m, nxt = speculative_accept(_probs(lg, gen), q, d)
            else:
                m, nxt = greedy_accept(lg, d)
            _crop(cache, n + 1 + m)
            c.rounds += 1
            c.drafted += len(drafts)
            c.accepted += m
            new = [*drafts[:m], nxt]
            for t in new:
                tokens.append(t)
                if t in eos:
                    break
            if search is not None and len(search.y) < cfg.search_trials and (self.score or 0.0) < cfg.target_score:
                context = torch.cat([input_ids, torch.tensor([tokens], device=device)], 1)
                self._search(model, search, context, cfg.trials_per_round)
        tokens = tokens[:max_new]
        c.generated += len(tokens)
        drafted = c.drafted - drafted0
        if drafted and (c.accepted - accepted0) / drafted < cfg.reoptimize_below:
            self.reset_layer_set()
        seq = torch.cat([input_ids, torch.tensor([tokens], dtype=input_ids.dtype, device=device)], 1)
        if gen.return_dict_in_generate:
            return GenerateDecoderOnlyOutput(sequences=seq, cache=cache)
        return seq


def _crop(cache: Any, length: int) -> None:
    """Cut every cache layer back to ``length`` tokens (layers the draft skipped may be shorter)."""
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise TypeError(f"self-speculative decoding supports DynamicCache layers, got {type(layer).__name__}")
        if layer.is_initialized and layer.keys.shape[-2] > length:
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]
