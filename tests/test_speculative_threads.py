"""SWIFT self-speculation and threads: a compiled draft skips only in the drafting thread, and a
concurrent generate is refused without corrupting the model (split from test_speculative.py)."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import mmskip
from mmskip.swift import SelfSpeculativeConfig

from .conftest import tiny_lm
from .test_speculative import plain, prompts


def test_compiled_draft_skips_only_in_the_drafting_thread():
    """Under ``torch.compile(fullgraph=True)`` the draft's thread check is a guard on a thread-local
    flag: while this thread drafts, its compiled forward is the draft's and another thread's
    compiled forward at the same time is the full model's (served correctly, as eager does)."""
    model = tiny_lm("llama", layers=6)
    ids = prompts(1, seed=5)[0]
    handle = mmskip.apply(model, SelfSpeculativeConfig(attn_skip=(2,), mlp_skip=(3, 4), confidence=0.0))
    draft = handle.state.draft
    with torch.no_grad():
        full = model(input_ids=ids).logits
        with draft.drafting():
            drafted = model(input_ids=ids).logits
        assert not torch.equal(drafted, full)
        model.forward = torch.compile(model.forward, backend="eager", fullgraph=True)
        try:
            with draft.drafting():
                mine = model(input_ids=ids).logits
                with ThreadPoolExecutor(max_workers=1) as other:
                    theirs = other.submit(lambda: model(input_ids=ids).logits).result()
            after = model(input_ids=ids).logits
        finally:
            del model.forward
            torch._dynamo.reset()
    assert torch.equal(mine, drafted) and torch.equal(theirs, full) and torch.equal(after, full)
    handle.remove()


def test_concurrent_generate_is_refused_and_never_corrupts_the_model():
    """Thread A is paused inside a draft forward: a plain forward from another thread computes the
    full model, a second generate raises ConcurrentUseError, A's output is still plain generate's,
    and after remove() the model is exactly what it was."""
    model = tiny_lm("llama", layers=6)
    ids = prompts(1, seed=4)[0]
    ref = plain(model, ids)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    handle = mmskip.apply(model, SelfSpeculativeConfig(attn_skip=(2,), mlp_skip=(3, 4), confidence=0.0, max_draft=4))
    inside, release = threading.Event(), threading.Event()
    calls = []
    result = {}

    def pause(module, args, kwargs):
        if threading.current_thread() is worker:
            calls.append(args[0].shape[1])
            if len(calls) == 2:  # the first draft forward (the first call is the prefill)
                inside.set()
                release.wait(30)

    def run():
        try:
            result["out"] = plain(model, ids)
        except BaseException as err:  # noqa: BLE001 - reported below
            result["err"] = err

    hook = model.model.layers[0].register_forward_pre_hook(pause, with_kwargs=True)
    worker = threading.Thread(target=run)
    worker.start()
    try:
        assert inside.wait(30)
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, before)
        with pytest.raises(mmskip.ConcurrentUseError):
            plain(model, ids)
    finally:
        release.set()
        worker.join(60)
        hook.remove()
    assert "err" not in result, result.get("err")
    assert calls[1] == 1 and torch.equal(result["out"], ref)
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    assert torch.equal(plain(model, ids), ref)
    for module in model.modules():
        assert "forward" not in module.__dict__ and "generate" not in module.__dict__
