"""Feature inheritance without a drop-in pipeline: trajectories are detected robustly, the cache stays
bounded, and concurrent use from two threads is refused."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from mmskip.diffusion import FeatureInheritanceConfig
from mmskip.diffusion.inheritance.state import MAX_SLOTS

from mmskip.inject import ConcurrentUseError, applied, apply
from mmskip.schedules import explicit

from ._tiny import example_inputs, tiny_dit, tiny_unet

TIMESTEPS = (900.0, 700.0, 500.0)
INHERIT = FeatureInheritanceConfig(schedule=explicit(keep=[0]))  # step 0 computes, later steps inherit


def _traj(m, seed, noise_seed=None, ts=TIMESTEPS):
    """One trajectory's denoiser calls: conditioning from ``seed``, latents from ``noise_seed``."""
    outs = []
    with torch.no_grad():
        for t in ts:
            kw = example_inputs(m, t, seed=seed)
            if noise_seed is not None:
                kw["sample" if "sample" in kw else "hidden_states"] = torch.randn(
                    kw.get("sample", kw.get("hidden_states")).shape, generator=torch.Generator().manual_seed(noise_seed)
                )
            outs.append(m(**kw)[0])
    return outs


def _fresh(builder, seed, noise_seed=None):
    m = builder()
    with applied(m, INHERIT):
        return _traj(m, seed, noise_seed)


@pytest.mark.parametrize("builder", [tiny_unet, tiny_dit])
def test_one_step_call_then_new_prompt_does_not_reuse_its_features(builder):
    m = builder()
    with applied(m, INHERIT):
        _traj(m, seed=0, ts=TIMESTEPS[:1])  # a 1-step (or interrupted) call
        out = _traj(m, seed=1)  # the next generation starts at the same timestep, another prompt
    ref = _fresh(builder, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))


def test_one_step_call_then_same_prompt_new_noise_starts_a_new_trajectory():
    m = tiny_unet()
    with applied(m, INHERIT) as h:
        _traj(m, seed=0, noise_seed=1, ts=TIMESTEPS[:1])
        out = _traj(m, seed=0, noise_seed=2)
        assert h.stats()["recomputed_steps"] == [0] and h.stats()["inherited_steps"] == 2
    ref = _fresh(tiny_unet, seed=0, noise_seed=2)
    assert all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))


def test_cache_is_bounded_and_reset_forgets(caplog):
    m = tiny_dit()
    with applied(m, INHERIT) as h:
        with caplog.at_level(logging.WARNING, logger="mmskip.diffusion.inheritance"):
            for seed in range(MAX_SLOTS + 3):  # many 1-step calls with different conditioning
                with torch.no_grad():
                    kw = example_inputs(m, 900.0, seed=seed)
                    kw["class_labels"] = torch.tensor([seed, seed + 1])
                    m(**kw)
        assert len(h.state.cache) == MAX_SLOTS
        assert "dropping the oldest" in caplog.text
        h.state.reset()
        assert not h.state.cache
        out = _traj(m, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(out, _fresh(tiny_dit, seed=0), strict=True))


def test_shape_change_recomputes_with_a_warning(caplog):
    m = tiny_dit()
    with applied(m, INHERIT):
        with torch.no_grad():
            kw = example_inputs(m, 900.0, batch=2)
            m(**kw)
            kw = example_inputs(m, 700.0, batch=2)
            kw["hidden_states"] = torch.randn(2, 4, 16, 16)  # a larger image, same conditioning
            with caplog.at_level(logging.WARNING, logger="mmskip.diffusion.inheritance"):
                out = m(**kw)[0]
        assert "recomputing" in caplog.text
    with torch.no_grad():
        assert torch.equal(out, m(**kw)[0])


def test_second_thread_is_refused_and_remove_is_exact():
    m = tiny_dit()
    ref = _traj(m, seed=0)
    handle = apply(m, INHERIT)
    entered, release = threading.Event(), threading.Event()

    def block(*_):
        entered.set()
        release.wait(10)

    hook = m.transformer_blocks[0].register_forward_pre_hook(block)
    worker = threading.Thread(target=_traj, args=(m, 0, None, TIMESTEPS[:1]))
    worker.start()
    assert entered.wait(10)
    try:
        with pytest.raises(ConcurrentUseError, match="two threads"):
            _traj(m, seed=1, ts=TIMESTEPS[:1])
    finally:
        release.set()
        worker.join()
        hook.remove()
    with pytest.raises(ConcurrentUseError):  # nor continue the trajectory the worker started
        _traj(m, seed=0, ts=TIMESTEPS[1:2])
    handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(_traj(m, seed=0), ref, strict=True))



def test_diffusers_stateful_hook_reset_forgets_the_trajectory():
    """``reset_stateful_hooks`` (run by diffusers pipelines after each call on cache-capable denoisers)."""
    m = tiny_dit()
    with applied(m, INHERIT) as h:
        _traj(m, seed=0, ts=TIMESTEPS[:2])
        m._diffusers_hook.reset_stateful_hooks()
        assert not h.state.cache
        out = _traj(m, seed=0, ts=TIMESTEPS[1:])  # starts below the last timestep: still a new trajectory
    ref = tiny_dit()
    with applied(ref, INHERIT):
        expected = _traj(ref, seed=0, ts=TIMESTEPS[1:])
    assert all(torch.equal(a, b) for a, b in zip(out, expected, strict=True))
