"""The step tracker's conditioning keys: :class:`CallKeyMemo` fingerprints a conditioning once while
the calls pass the same, unchanged tensors (a pipeline's prompt embeddings along a trajectory)."""

from __future__ import annotations

import torch
from mmskip.diffusion import tracker
from mmskip.diffusion.tracker import CallKeyMemo

SKIP = ((0, 1), ("sample", "timestep"))


def _kw(emb, **extra):
    """One call's inputs: fresh latents and timestep (never part of the key), the given conditioning."""
    return dict(sample=torch.randn(2, 4, 8, 8), timestep=torch.tensor(500.0), encoder_hidden_states=emb, **extra)


def _counting(monkeypatch):
    calls, real = [], tracker.call_key

    def count(*a):
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(tracker, "call_key", count)
    return calls, real


def test_memo_fingerprints_once_while_the_conditioning_is_unchanged(monkeypatch):
    calls, real = _counting(monkeypatch)
    memo, emb = CallKeyMemo(), torch.randn(2, 5, 16)
    k0 = memo.key((), _kw(emb), *SKIP)
    assert all(memo.key((), _kw(emb), *SKIP) == k0 for _ in range(3)) and len(calls) == 1
    emb.mul_(2.0)  # changed in place: its version counter moved
    k1 = memo.key((), _kw(emb), *SKIP)
    assert len(calls) == 2 and k1 != k0 and k1 == real((), _kw(emb), *SKIP)
    copy = emb.clone()  # another tensor with the same values: fingerprinted again, the same key
    assert memo.key((), _kw(copy), *SKIP) == k1 and len(calls) == 3
    assert memo.key((), _kw(copy, return_dict=True), *SKIP) != k1 and len(calls) == 4  # a plain input differs
    memo.clear()
    assert memo.key((), _kw(copy, return_dict=True), *SKIP) and len(calls) == 5


def test_memo_sees_nested_inputs_and_skips_inference_tensors(monkeypatch):
    calls, real = _counting(monkeypatch)
    memo, emb, ids = CallKeyMemo(), torch.randn(2, 5, 16), torch.zeros(2, 6)
    kw = _kw(emb, added_cond_kwargs={"time_ids": ids})
    k0 = memo.key((), kw, *SKIP)
    ids.add_(1.0)  # a tensor inside a dict, changed in place
    assert memo.key((), kw, *SKIP) != k0 and len(calls) == 2
    with torch.inference_mode():
        frozen = torch.randn(2, 5, 16)  # no version counter: an in-place change could not be seen
    memo.key((), _kw(frozen), *SKIP)
    memo.key((), _kw(frozen), *SKIP)
    assert len(calls) == 4
