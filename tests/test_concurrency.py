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


class _PauseAfter:
    """A stopping criterion that parks its thread between two decode steps until released."""

    def __init__(self, step: int) -> None:
        self.step, self.calls = step, 0
        self.parked, self.release = threading.Event(), threading.Event()

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        if self.calls == self.step:
            self.parked.set()
            assert self.release.wait(10)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


class _BlockingStreamer:
    """A streamer whose first ``put()`` (the prompt) blocks until released."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()

    def put(self, value):
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(10)

    def end(self):
        pass


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.technique)
def test_generate_paused_between_steps_is_not_corrupted_by_another_threads_generate(config):
    """Thread A parks between decode steps; thread B starts a generate (its streamer blocks at the
    prompt); A resumes. A's tokens must equal a lone run's, and B must be refused, not served."""
    from transformers import StoppingCriteriaList

    model = tiny_lm("llama", layers=6)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    other = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=8, do_sample=False)
    with torch.no_grad(), mmskip.applied(model, config):
        want = model.generate(ids, **kw)
        pause, streamer = _PauseAfter(3), _BlockingStreamer()
        box: dict = {}

        def run_a():
            box["a"] = model.generate(ids, stopping_criteria=StoppingCriteriaList([pause]), **kw)

        def run_b():
            try:
                box["b"] = model.generate(other, streamer=streamer, **kw)
            except mmskip.ConcurrentUseError as e:
                box["b_error"] = e
            finally:
                streamer.entered.set()  # refused before its first put(): let the test go on

        a = threading.Thread(target=run_a)
        a.start()
        assert pause.parked.wait(10)
        b = threading.Thread(target=run_b)
        b.start()
        assert streamer.entered.wait(10)
        pause.release.set()
        a.join(10)
        streamer.release.set()
        b.join(10)
        assert torch.equal(box["a"], want)
        assert "b_error" in box and "b" not in box
        assert torch.equal(model.generate(ids, **kw), want)  # the model serves again once A is done


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.technique)
def test_free_running_threads_are_served_correctly_or_refused(config):
    model = tiny_lm("llama", layers=6)
    prompts = [torch.randint(3, 128, (1, 5 + i), generator=torch.Generator().manual_seed(10 + i)) for i in range(4)]
    kw = dict(max_new_tokens=6, do_sample=False)
    with torch.no_grad(), mmskip.applied(model, config):
        want = [model.generate(p, **kw) for p in prompts]

        def run(i: int):
            out = []
            for _ in range(5):
                try:
                    out.append(model.generate(prompts[i], **kw))
                except mmskip.ConcurrentUseError:
                    pass
            return out

        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(run, range(4)))
    for i, outs in enumerate(results):
        for out in outs:
            assert torch.equal(out, want[i])
