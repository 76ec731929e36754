"""SWIFT: on-the-fly self-speculative decoding (Xia et al., 2024, https://arxiv.org/abs/2410.06916).

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
  a call whose acceptance rate falls below ``reoptimize_below`` makes the next call search again.
  ``handle.state.found_config()`` is the config with that set fixed: saved (``save_pretrained``),
  it lets the search run once per model, not once per process.
- **Lossless**: greedy output is the full model's greedy output token for token; sampling uses
  the speculative-sampling acceptance rule (Leviathan et al., 2023; Chen et al., 2023) on the
  distributions transformers' own logits processors and warpers produce, so the sampled tokens
  follow the full model's distribution.
- **KV cache**: the cache ``generate`` prepared (full or sliding-window ``DynamicCache`` layers).
  Past tokens always hold the full model's K/V; the draft reads them and appends its own K/V
  for drafted tokens at the layers whose attention it runs. Before verification the cache is
  cut back to the verified length, the full model writes the K/V of the drafted tokens at
  every layer, and after acceptance the rejected tail is cut off; accepted tokens are never
  recomputed.

How it plugs into ``generate`` (the seam, chosen deliberately): transformers 5 lets a caller
replace the decoding loop with ``generate(custom_generate=callable)``: ``generate`` still
resolves and validates the generation config (raising its own errors, e.g. for ``max_length``
below the prompt or ``do_sample=True, temperature=0``), builds the logits processors, warpers
and stopping criteria and the model's cache, then calls the callable instead of its greedy /
sampling loop. The SWIFT loop is that callable (:func:`swift_decode`), so everything but the
loop is transformers' own. The other seam, a ``CandidateGenerator`` for assisted decoding (as
``assistant_early_exit`` uses), was rejected: ``generate`` offers no way to pass one in, and its
assistant generates through its own ``generate`` call with its own cache, so the draft could not
reuse the full model's K/V, and SWIFT's per-round layer-set search would have nowhere to run.

The user call is unchanged: ``mmskip.apply(model, SelfSpeculativeConfig())``, then the usual
``model.generate(...)``. While applied, ``model.generate`` is
bound to transformers' ``generate`` with ``custom_generate=swift_decode`` added, the way
transformers itself binds a model's own custom generate in ``from_pretrained``; the explicit
form ``model.generate(..., custom_generate=mmskip.swift.swift_decode)`` does the same.
``handle.remove()`` restores the model's own ``generate`` and takes off the draft's hooks
(the shared ``SkipUnitHook`` on the candidate layers, attention and MLP modules, which skip
only inside a draft forward of the generating thread). Two threads generating with one model at
once raise :class:`mmskip.ConcurrentUseError`; the model is never left modified.

What SWIFT serves, and what it hands to transformers: SWIFT decodes one sequence (batch size 1),
greedily or by sampling, from ``input_ids`` into ``generate``'s default dynamic cache (full or
sliding-window layers, or an empty ``DynamicCache`` the caller passes). Everything ``generate``
turns into logits processors and stopping criteria works: the processors run on the full model's
logits at every verified position with the ids up to it, and the criteria are checked after every
accepted token with the scores so far, as in transformers' assisted decoding (``repetition_penalty``,
``bad_words_ids``, ``no_repeat_ngram_size``, min/max length, EOS, ``max_time``, custom
``LogitsProcessor`` / ``StoppingCriteria``, which must depend on their arguments only), so greedy
output stays the model's own. ``output_scores`` / ``output_logits`` are served, as is a streamer.
A call SWIFT cannot serve runs as the model's plain ``generate`` (the full model: the draft's
hooks act only inside a draft forward) with a ``UserWarning`` once per reason per handle, counted
in ``handle.stats()["fallbacks"]``: batch size > 1 (``num_return_sequences`` > 1 included), beam
search and the other decoding modes (``num_beams`` > 1, contrastive, DoLa, constrained),
``assistant_model`` / ``prompt_lookup_num_tokens`` / ``assistant_early_exit``, ``inputs_embeds``,
``use_cache=False``, a ``cache_implementation`` other than dynamic or a pre-filled cache,
``output_attentions`` / ``output_hidden_states``, classifier-free guidance (``guidance_scale``,
whose processor keeps its own cache), model inputs other than ``attention_mask`` /
``position_ids`` (e.g. ``token_type_ids``), an attention mask that is not left padding,
``synced_gpus=True``, and ``stop_strings`` / ``token_healing`` (``generate`` gives a custom loop
no tokenizer; a ``StopStringCriteria`` in ``stopping_criteria`` is served). Values count, not
presence: ``streamer=None``, ``output_scores=False`` are the defaults. The explicit
``custom_generate=swift_decode`` raises ``ValueError`` with the reason instead of falling back.

Modules: ``config`` (the config), ``state`` (what an application remembers: the draft, the
layer set, counters), ``hooks`` (the attach), ``acceptance`` (greedy and speculative-sampling
rules), ``search`` (the layer-set search), ``draft`` (the skipping hooks), ``cache`` (crop rules
for full and sliding-window cache layers), ``generate`` (the decoding loop), ``fallback`` (what
SWIFT cannot serve), ``route`` (the seam into ``generate``). ``swift_decode`` loads
on first access, so reading a config imports no ``diffusers``. Saved configs
that name the old module ``mmskip.speculative`` still load (technique id ``self_speculative``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .acceptance import greedy_accept, speculative_accept
from .config import SelfSpeculativeConfig
from .state import SwiftState

if TYPE_CHECKING:
    from .route import swift_decode

__all__ = ["SelfSpeculativeConfig", "speculative_accept", "greedy_accept", "swift_decode", "SwiftState"]

_LAZY = {"swift_decode": "route"}  # imports the hook machinery (diffusers)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
