"""``lookup_draft``: the tokens after the latest earlier occurrence of the context's last n-gram."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmskip
from mmskip.inject import SkipConfig
from mmskip.swift import SelfSpeculativeConfig, speculative_accept
from mmskip.swift.lookup import lookup_draft

from ..conftest import tiny_lm


def _ids(*tokens: int) -> np.ndarray:
    return np.array(tokens, dtype=np.int64)


def test_longest_ngram_wins_and_latest_occurrence_is_used() -> None:
    #          0  1  2  3  4  5  6  7  8  9 10
    context = _ids(5, 6, 7, 1, 6, 7, 2, 9, 6, 7)
    # bigram (6, 7) occurs at 1 and 4: the latest (4) is followed by 2, 9, 6
    assert lookup_draft(context, 2, 4, 3) == [2, 9, 6]
    # the trigram (9, 6, 7) never occurred before, so max_n = 3 still falls back to the bigram
    assert lookup_draft(context, 2, 3, 2) == [2, 9]
    # a unigram that did not occur earlier finds nothing
    assert lookup_draft(_ids(1, 2, 3, 4), 1, 3, 4) == []


def test_longer_match_beats_a_later_shorter_one() -> None:
    context = _ids(1, 2, 3, 8, 8, 4, 2, 3, 5, 1, 2, 3)
    # (1, 2, 3) occurred at 0, followed by 8; the bigram (2, 3) occurred later, at 6, followed by 5
    assert lookup_draft(context, 2, 3, 2) == [8, 8]
    assert lookup_draft(context, 2, 2, 2) == [5, 1]


def test_continuation_may_run_into_the_suffix_and_stops_at_the_end() -> None:
    assert lookup_draft(_ids(4, 5, 4, 5), 2, 2, 5) == [4, 5]
    assert lookup_draft(_ids(7, 7, 7), 1, 2, 4) == [7]


def test_min_n_above_the_context_finds_nothing() -> None:
    assert lookup_draft(_ids(3), 1, 4, 4) == []
    assert lookup_draft(_ids(3, 3), 2, 4, 4) == []


# -- SWIFT with prompt lookup: lossless, and both draft sources used ---------------------------------
NEW = 24
EAGER = dict(confidence=0.0, max_draft=5, search_trials=10, random_trials=4)


def _repeating_prompts(n: int, seed: int = 0) -> list[torch.Tensor]:
    """Prompts that repeat a random phrase, so that the context's n-grams recur."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (1, 5 + i % 3), generator=g).repeat(1, 3) for i in range(n)]


def _plain(model: torch.nn.Module, ids: torch.Tensor, **kw: object) -> torch.Tensor:
    kw.setdefault("do_sample", False)
    with torch.no_grad():
        return model.generate(input_ids=ids, max_new_tokens=NEW, **kw)


def test_swift_with_prompt_lookup_equals_plain_greedy() -> None:
    model = tiny_lm("llama", layers=8)
    ps = _repeating_prompts(8)
    ref = [_plain(model, p) for p in ps]
    with mmskip.applied(model, SelfSpeculativeConfig(prompt_lookup=(1, 3), **EAGER)) as handle:
        out = [_plain(model, p) for p in ps]
        stats = handle.stats()
    for a, b in zip(ref, out):
        assert torch.equal(a, b)
    # every token is a prefill token or a verified one; lookup drafted in some rounds, the layers in others
    assert stats["generated_tokens"] == 8 * NEW == stats["accepted_tokens"] + stats["verify_forwards"] + 8
    assert 0 < stats["lookup_rounds"] < stats["verify_forwards"]
    assert 0 < stats["lookup_drafted_tokens"] < stats["drafted_tokens"]
    assert 0 <= stats["lookup_accepted_tokens"] <= stats["lookup_drafted_tokens"]
    # a lookup round runs no draft forward: with lookup there are fewer draft forwards than drafted tokens
    assert stats["draft_forwards"] == stats["drafted_tokens"] - stats["lookup_drafted_tokens"]


def test_swift_with_prompt_lookup_samples_from_the_full_model() -> None:
    model = tiny_lm("llama", layers=6)
    ids = _repeating_prompts(1, seed=2)[0]
    ref = _plain(model, ids)
    with mmskip.applied(model, SelfSpeculativeConfig(prompt_lookup=(1, 2), **EAGER)) as handle:
        assert torch.equal(_plain(model, ids, do_sample=True, top_k=1), ref)
        torch.manual_seed(0)
        out = model.generate(input_ids=ids, max_new_tokens=NEW, do_sample=True, temperature=0.8,
                             return_dict_in_generate=True, output_logits=True)
        assert handle.stats()["lookup_rounds"] > 0
    seq, P = out.sequences, ids.shape[1]
    with torch.no_grad():
        full = model(input_ids=seq[:, :-1]).logits[0, P - 1:]
    torch.testing.assert_close(torch.cat(out.logits), full, atol=1e-4, rtol=1e-4)


def test_point_mass_proposals_keep_the_target_distribution() -> None:
    """A looked-up token is a proposal of probability 1: accepted with probability p(d), else the
    next token is drawn from p without d, so every token still follows p."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3]])
    q = torch.tensor([[0.0, 1.0, 0.0]])
    counts = torch.zeros(3)
    n = 20000
    for _ in range(n):
        m, nxt = speculative_accept(p, q, torch.tensor([1]), generator=g)
        counts[1 if m == 1 else nxt] += 1
    assert torch.allclose(counts / n, p[0], atol=0.015)


@pytest.mark.parametrize("bad", [(0, 2), (3, 2)])
def test_bad_prompt_lookup_is_refused(bad: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="prompt_lookup is \\(min_n, max_n\\)"):
        SelfSpeculativeConfig(prompt_lookup=bad)


def test_prompt_lookup_saves_and_loads(tmp_path) -> None:  # noqa: ANN001
    SelfSpeculativeConfig(prompt_lookup=(2, 4), attn_skip=(1,)).save_pretrained(tmp_path)
    loaded = SkipConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SelfSpeculativeConfig) and loaded.prompt_lookup == (2, 4)
