"""Prompt lookup: draft the tokens that followed the latest earlier occurrence of the context's last
n tokens (Saxena's prompt-lookup decoding, the rule of vLLM's ``ngram`` method).

SWIFT (``SelfSpeculativeConfig(prompt_lookup=...)``) and the vLLM drafter
(``mmskip_draft.prompt_lookup``) try it before the layer-skipping draft: a match costs no forward
pass, so only rounds (or rows) without one run the draft. Code and other text that repeats itself
(identifiers, argument lists) finds many matches.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["lookup_draft"]


def lookup_draft(context: np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of ``context``'s last n tokens,
    for the longest n in ``max_n..min_n`` that occurs; ``[]`` when none does.

    The continuation may run into the suffix itself (``a b a b`` -> ``a b``), as in vLLM's rule.
    """
    total = len(context)
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        windows = sliding_window_view(context[: total - 1], n)  # every n-gram that ends before the last token
        hits = np.flatnonzero((windows == context[total - n:]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return [int(t) for t in context[start:start + k]]
    return []
