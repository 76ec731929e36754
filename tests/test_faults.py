"""Faults mid-call: a KeyboardInterrupt raised inside a forward during ``generate`` leaves the next
``generate`` equal to a fresh application's, and ``remove()`` exact."""

import pytest
import torch

import mmskip
from mmskip import schedules
from mmskip.first_routers import RouterConfig

from .conftest import tiny_lm
from .test_routers import fixed_routers

CONFIGS = {
    "layer_skip": lambda tmp: mmskip.LayerSkipConfig(schedule=schedules.unified(2.0)),
    "ffn_skip": lambda tmp: mmskip.FFNSkipConfig(schedule=schedules.adaptive(0.0, warmup=0, max_skip=0.5),
                                                 cold=(1, 1)),
    "void_layers": lambda tmp: mmskip.VoidLayerConfig(),
    "self_speculative": lambda tmp: mmskip.SelfSpeculativeConfig(skip_ratio=0.3, search_trials=4, random_trials=2),
    "first_routers": lambda tmp: RouterConfig(path=fixed_routers(_model(), {2, 4}, tmp)),
}


def _model() -> torch.nn.Module:
    return tiny_lm("llama", layers=6, seed=4)


class _InterruptOn:
    """A forward pre-hook that raises KeyboardInterrupt on the n-th call of its module."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def __call__(self, module, args):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("when", [1, 4], ids=["in-prefill", "mid-decode"])
def test_interrupt_mid_generate_leaves_the_model_serving_correctly(name, when, tmp_path):
    ids = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=8, do_sample=False)
    config = CONFIGS[name](tmp_path)
    fresh = _model()
    with torch.no_grad(), mmskip.applied(fresh, config):
        want = fresh.generate(ids, **kw)  # what a fresh application gives

    model = _model()
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        handle = mmskip.apply(model, config)
        hook = model.model.layers[5].register_forward_pre_hook(_InterruptOn(when))
        with pytest.raises(KeyboardInterrupt):
            model.generate(ids, **kw)
        hook.remove()
        assert torch.equal(model.generate(ids, **kw), want)
        handle.remove()
        assert torch.equal(model.generate(ids, **kw), ref)
