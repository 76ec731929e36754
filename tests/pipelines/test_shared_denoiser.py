"""A plain pipeline sharing its denoiser with a running Skip pipeline, from another thread.

Deterministic interleavings: each thread is paused inside a denoiser forward (a torch forward
pre-hook that waits on an event, only on that thread), the other runs, then the first resumes.
The plain pipeline's output must equal an unhooked run, the Skip pipeline's its solo run; a
second Skip call that would hook the same denoiser is refused with ConcurrentUseError.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusionPipeline
from mmskip.diffusion import FeatureInheritanceConfig, StepSkipConfig, UNetSwitchConfig
from mmskip.diffusion.assembly import assemble_unet, save_assembled
from mmskip.pipelines import SkipFluxPipeline, SkipStableDiffusionPipeline

from mmskip import ConcurrentUseError
from mmskip.schedules import interval

from ..diffusion._tiny import tiny_pipeline_components
from ..diffusion._tiny_families import tiny_family_pipeline_components

WAIT = 60


def _img(pipe, kw):
    out = pipe(generator=torch.Generator().manual_seed(0), **kw)
    return out.images if hasattr(out, "images") else out[0]


def _quiet(*pipes):
    for p in pipes:
        p.set_progress_bar_config(disable=True)
    return pipes


def _hooks(module):
    return {n for m in module.modules() if getattr(m, "_diffusers_hook", None) for n in m._diffusers_hook.hooks}


_PAUSES: list[Pause] = []


@pytest.fixture(autouse=True)
def _release_pauses():
    """A failed assertion never leaves a paused thread waiting."""
    yield
    while _PAUSES:
        _PAUSES.pop().resume()


class Pause:
    """Waits inside ``module``'s ``nth`` forward made by thread ``name``, until released."""

    def __init__(self, module, name, nth=1):
        self.name, self.nth, self.calls = name, nth, 0
        self.entered, self.release = threading.Event(), threading.Event()
        self.handle = module.register_forward_pre_hook(self)
        _PAUSES.append(self)

    def __call__(self, module, args):
        if threading.current_thread().name != self.name:
            return
        self.calls += 1
        if self.calls == self.nth:
            self.entered.set()
            assert self.release.wait(WAIT)

    def resume(self):
        self.release.set()
        self.handle.remove()


class Run(threading.Thread):
    """A pipeline call in its own (named) thread; keeps its output or the exception it raised."""

    def __init__(self, fn, name):
        super().__init__(name=name, daemon=True)
        self.fn, self.out, self.err = fn, None, None
        self.start()

    def run(self):
        try:
            self.out = self.fn()
        except BaseException as err:  # noqa: BLE001 - the test asserts on it
            self.err = err

    def result(self):
        self.join(WAIT)
        assert not self.is_alive()
        if self.err is not None:
            raise self.err
        return self.out


def _own_scheduler(comps):
    """The components with a scheduler of their own: a diffusers scheduler holds per-call state
    (its step index), so pipelines running at the same time must not share one."""
    return dict(comps, scheduler=copy.deepcopy(comps["scheduler"]))


def _sd():
    comps, kw = tiny_pipeline_components("sd")
    plain, skip = _quiet(StableDiffusionPipeline(**_own_scheduler(comps)), SkipStableDiffusionPipeline(**comps))
    return plain, skip, kw


def test_plain_call_in_flight_while_a_skip_call_attaches_its_hooks():
    """The reported failure: the plain call was inside the UNet when the Skip call attached its
    hooks; it then reached ``up_blocks.0`` ("ran before the adaptive probe decided this step")."""
    plain, skip, kw = _sd()
    skip.enable_skip(FeatureInheritanceConfig(interval(2)))
    ref_plain, ref_skip = _img(plain, kw), _img(skip, kw)
    assert not torch.equal(ref_plain, ref_skip)
    in_plain = Pause(plain.unet.mid_block, "plain")  # inside the plain call's first UNet forward
    in_skip = Pause(skip.unet, "skip")  # the Skip call's hooks are attached; none of its steps ran
    b = Run(lambda: _img(plain, kw), "plain")
    assert in_plain.entered.wait(WAIT)
    a = Run(lambda: _img(skip, kw), "skip")
    assert in_skip.entered.wait(WAIT)
    assert "mmskip.feature_inheritance" in _hooks(skip.unet)
    in_plain.resume()
    assert torch.equal(b.result(), ref_plain)  # the whole plain call ran beside the Skip call's hooks
    in_skip.resume()
    assert torch.equal(a.result(), ref_skip)
    assert not _hooks(skip.unet)


def test_plain_and_step_skip_calls_while_a_skip_call_is_inside_an_inherited_step():
    plain, skip, kw = _sd()
    comps, _ = tiny_pipeline_components("sd")
    steps = _quiet(SkipStableDiffusionPipeline(**_own_scheduler(dict(comps, unet=skip.unet))))[0]
    steps.enable_skip(StepSkipConfig(interval(2)))
    other = _quiet(SkipStableDiffusionPipeline(**_own_scheduler(dict(comps, unet=skip.unet))))[0]
    other.enable_skip(FeatureInheritanceConfig(interval(3)))
    skip.enable_skip(FeatureInheritanceConfig(interval(2)))
    ref_plain, ref_skip, ref_steps, ref_other = _img(plain, kw), _img(skip, kw), _img(steps, kw), _img(other, kw)
    other.disable_skip()
    other.enable_skip(FeatureInheritanceConfig(interval(3)))  # no last call recorded
    inside = Pause(skip.unet.mid_block, "skip", nth=2)  # step 1: inherits (interval(2))
    a = Run(lambda: _img(skip, kw), "skip")
    assert inside.entered.wait(WAIT)
    assert torch.equal(_img(plain, kw), ref_plain)
    assert torch.equal(_img(steps, kw), ref_steps)  # a Skip pipeline that attaches no hooks runs too
    with pytest.raises(ConcurrentUseError, match="another pipeline call"):
        _img(other, kw)  # would hook the same UNet: refused before anything changed
    assert other.skip_handle is None and other.skip_stats() == {}
    inside.resume()
    assert torch.equal(a.result(), ref_skip)
    assert torch.equal(_img(other, kw), ref_other)
    assert not _hooks(skip.unet)


def test_plain_flux_call_does_not_reset_a_running_skip_call():
    """Flux pipelines reset the transformer's stateful hooks at the end of each call
    (``maybe_free_model_hooks``); a plain call must not reset the Skip call's trajectory."""
    comps, kw = tiny_family_pipeline_components("flux")
    plain, skip = _quiet(FluxPipeline(**_own_scheduler(comps)), SkipFluxPipeline(**comps))
    skip.enable_skip(FeatureInheritanceConfig(interval(2)))
    ref_plain, ref_skip = _img(plain, kw), _img(skip, kw)
    assert not torch.equal(ref_plain, ref_skip)
    between = Pause(skip.transformer, "skip", nth=3)  # before step 2, after two steps
    a = Run(lambda: _img(skip, kw), "skip")
    assert between.entered.wait(WAIT)
    assert torch.equal(_img(plain, kw), ref_plain)
    between.resume()
    assert torch.equal(a.result(), ref_skip)
    assert skip.skip_stats()["recomputed_steps"] == [0, 2, 4]


def test_plain_call_is_not_routed_to_a_running_skip_calls_light_unet(tmp_path):
    plain, skip, kw = _sd()
    save_assembled(assemble_unet(skip.unet, ["mid", "up_attn.1"]), tmp_path / "light")
    skip.enable_skip(UNetSwitchConfig(light=str(tmp_path / "light"), full_fraction=0.5))
    ref_plain, ref_skip = _img(plain, kw), _img(skip, kw)
    assert not torch.equal(ref_plain, ref_skip)
    light_steps = Pause(skip.unet, "skip", nth=4)  # step 3 of 6: the light UNet's
    a = Run(lambda: _img(skip, kw), "skip")
    assert light_steps.entered.wait(WAIT)
    assert torch.equal(_img(plain, kw), ref_plain)
    light_steps.resume()
    assert torch.equal(a.result(), ref_skip)
    assert skip.skip_stats()["light_unet_steps"] == [3, 4, 5]
