"""Two threads on one model with a technique applied: refused clearly, never a wrong result."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import DynamicCache

import mmskip
from mmskip import schedules

from .conftest import tiny_lm

CONFIGS = [
    mmskip.LayerSkipConfig(schedule=schedules.unified(2.0)),
    mmskip.FFNSkipConfig(schedule=schedules.adaptive(0.0, warmup=0, max_skip=0.5), cold=(1, 1)),
    mmskip.VoidLayerConfig(),
]


def _worker() -> ThreadPoolExecutor:
    """One live thread that runs what it is given (a thread keeps its identity between calls)."""
    return ThreadPoolExecutor(max_workers=1)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.technique)
def test_interleaved_generations_from_two_threads_are_refused(config):
    model = tiny_lm("llama", layers=6)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        handle = mmskip.apply(model, config)
        cache_a, cache_b = DynamicCache(config=model.config), DynamicCache(config=model.config)
        a, b = _worker(), _worker()
        out_a = a.submit(model, input_ids=ids, cache=cache_a, use_cache=True).result()  # thread A: prefill
        b.submit(model, input_ids=ids, cache=cache_b, use_cache=True).result()  # thread B: its own prefill
        nxt = out_a.logits[:, -1:].argmax(-1)
        with pytest.raises(mmskip.ConcurrentUseError, match="two threads"):
            a.submit(model, input_ids=nxt, cache=cache_a, use_cache=True).result()  # A decodes on B's state
        b.submit(model, input_ids=nxt, cache=cache_b, use_cache=True).result()  # B goes on with its own
        a.shutdown()
        b.shutdown()
        handle.remove()
        assert torch.equal(ref, model(input_ids=ids).logits)


def test_overlapping_forwards_are_refused_and_the_first_finishes():
    model = tiny_lm("llama", layers=4)
    ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(1))
    inside, release = threading.Event(), threading.Event()

    def wait(module, args):  # thread A pauses inside the forward
        if threading.current_thread() is not threading.main_thread() and not release.is_set():
            inside.set()
            release.wait(10)

    with torch.no_grad():
        ref = model(input_ids=ids).logits
        handle = mmskip.apply(model, mmskip.LayerSkipConfig(schedule=schedules.unified(2.0), phase="all"))
        want = model(input_ids=ids).logits
        pause = model.model.layers[0].register_forward_pre_hook(wait)
        box = {}
        a = threading.Thread(target=lambda: box.setdefault("a", model(input_ids=ids).logits))
        a.start()
        assert inside.wait(10)
        with pytest.raises(mmskip.ConcurrentUseError):
            model(input_ids=ids)
        release.set()
        a.join()
        pause.remove()
        assert torch.equal(box["a"], want)  # the first call was not disturbed
        handle.remove()
        assert torch.equal(ref, model(input_ids=ids).logits)
