"""``lookup_draft``: the tokens after the latest earlier occurrence of the context's last n-gram."""

from __future__ import annotations

import numpy as np
from mmskip_vllm.prompt_lookup import lookup_draft


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
