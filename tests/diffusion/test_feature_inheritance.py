"""Feature inheritance (A-SDM) on tiny random-init UNet / DiT / PixArt / SD3 denoisers."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from mmskip.diffusion import FeatureInheritanceConfig
from mmskip.diffusion.step_schedules import from_changes, nonuniform
from torch.utils.flop_counter import FlopCounterMode

from mmskip.inject import SkipConfig, applied, apply
from mmskip.registry import UnsupportedModelError
from mmskip.schedules import adaptive, explicit, interval

from .._ops import op_counts
from ._tiny import (
    example_inputs,
    target_modules,
    tiny_dit,
    tiny_pixart,
    tiny_sd3,
    tiny_unet,
)

BUILDERS = {
    "unet": tiny_unet,
    "unet_xl": lambda: tiny_unet(sdxl=True),
    "dit": tiny_dit,
    "pixart": tiny_pixart,
    "sd3": tiny_sd3,
}
TIMESTEPS = (900.0, 700.0, 500.0, 300.0)


@pytest.fixture(scope="module", params=list(BUILDERS))
def model(request):
    return BUILDERS[request.param]()


def _run(m, ts=TIMESTEPS):
    with torch.no_grad():
        return [m(**example_inputs(m, t))[0] for t in ts]


def _count_calls(m, names):
    """Calls of every parameterised leaf inside each target (the target's own __call__ still happens)."""
    counts = {}
    handles = []
    for n in names:
        for sub, mod in m.get_submodule(n).named_modules():
            if sub and not list(mod.children()) and list(mod.parameters()):
                key = f"{n}.{sub}"
                counts[key] = 0

                def pre(mod, args, key=key):
                    counts[key] += 1

                handles.append(mod.register_forward_pre_hook(pre))
    assert counts
    return counts, handles


@pytest.mark.parametrize("granularity", ["block", "layer", "unit"])
def test_inherited_targets_do_not_run_and_remove_restores(model, granularity):
    with FlopCounterMode(display=False) as fc:
        ref = _run(model)
    full_flops = fc.get_total_flops()
    cfg = FeatureInheritanceConfig(schedule=interval(2), granularity=granularity)
    handle = apply(model, cfg)
    targets = handle.stats()["targets"]
    counts, hooks = _count_calls(model, target_modules(targets))
    with FlopCounterMode(display=False) as fc:
        out = _run(model)
    spent_flops = fc.get_total_flops()
    for h in hooks:
        h.remove()
    stats = handle.stats()
    handle.remove()
    # steps 0 and 2 recompute; 1 and 3 inherit: every target ran exactly twice
    assert stats["recomputed_steps"] == [0, 2]
    assert all(c == 2 for c in counts.values()), counts
    assert torch.equal(out[0], ref[0]) and torch.equal(out[2], ref[2])
    assert not torch.equal(out[1], ref[1])
    # each target is reached once per call and skipped on the two inherit steps
    assert stats["skipped"] == 2 * len(targets) and stats["executed"] == 2 * len(targets)
    # the estimated FLOPs fraction is what an external counter measures
    assert stats["flops"] == {"spent": spent_flops, "full": full_flops}
    assert stats["flops_fraction"] == pytest.approx(spent_flops / full_flops, rel=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(_run(model), ref, strict=True))


def test_inherited_output_equals_manual_reuse():
    """On an inherit step, the DiT range adds exactly the residual cached at the recompute step."""
    m = tiny_dit()
    cache = {}

    def grab(mod, args, kwargs, out, key):
        cache[key] = out

    blocks = m.transformer_blocks
    with torch.no_grad():
        h1 = blocks[1].register_forward_hook(lambda mo, a, k, o: grab(mo, a, k, k["hidden_states"] if "hidden_states" in k else a[0], "in"), with_kwargs=True)
        h2 = blocks[2].register_forward_hook(lambda mo, a, k, o: grab(mo, a, k, o, "out"), with_kwargs=True)
        m(**example_inputs(m, 900.0))
        h1.remove()
        h2.remove()
        residual = cache["out"] - cache["in"]
        seen = {}
        h3 = blocks[3].register_forward_pre_hook(lambda mo, a, k: seen.update(x=k.get("hidden_states", a[0] if a else None)), with_kwargs=True)
        b1 = blocks[1].register_forward_pre_hook(lambda mo, a, k: seen.update(x1=k.get("hidden_states", a[0] if a else None)), with_kwargs=True)
        with applied(m, FeatureInheritanceConfig(schedule=explicit(keep=[0]), targets=("transformer_blocks.1:3",))):
            m(**example_inputs(m, 900.0))
            m(**example_inputs(m, 500.0))
        h3.remove()
        b1.remove()
    torch.testing.assert_close(seen["x"], seen["x1"] + residual)


def test_cfg_batch_and_separate_calls_keep_separate_caches():
    m = tiny_dit()
    with applied(m, FeatureInheritanceConfig(schedule=interval(2))) as h:
        with torch.no_grad():
            for t in TIMESTEPS:  # two calls per step (cond, uncond) with different batches
                m(**example_inputs(m, t, batch=2, seed=1))
                m(**example_inputs(m, t, batch=4, seed=2))
        st = h.stats()
    assert st["recomputed_steps"] == [0, 2]
    assert st["items"]["transformer_blocks.1:3"]["skipped"] == 4


@pytest.mark.parametrize("schedule", [interval(1), explicit(skip=())])
def test_recompute_every_step_runs_the_plain_ops(model, schedule, monkeypatch):
    """Nothing ever inherited: no target hooked, no residual kept, no conditioning fingerprint
    along a trajectory (one call per step): the plain model's ops plus the timestep read."""
    from mmskip.diffusion.adapters import denoisers

    def never(*a, **k):
        raise AssertionError("fingerprinted the conditioning of a single-call step")

    ref, plain = op_counts(lambda: _run(model))
    with applied(model, FeatureInheritanceConfig(schedule=schedule, measure_flops=False)) as h:
        assert not any("_diffusers_hook" in m.__dict__ for m in model.modules() if m is not model)
        with monkeypatch.context() as mp:
            mp.setattr(denoisers, "call_key", never)
            out, zero = op_counts(lambda: _run(model))
        st = h.stats()
    assert all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))
    assert plain - zero == Counter()
    assert set(zero - plain) <= {"select", "view", "_local_scalar_dense"}  # float(timestep) per call
    assert st["recomputed_steps"] == [0, 1, 2, 3] and st["skipped"] == 0
    assert all(st["items"][n]["executed"] == len(TIMESTEPS) for n in st["targets"])


def test_recompute_every_step_still_tells_branches_and_restarts():
    """Deferred keys: two calls per step (cond, uncond) are one step; the same conditioning at the
    same timestep again is a new trajectory."""
    m = tiny_dit()
    with applied(m, FeatureInheritanceConfig(schedule=interval(1), measure_flops=False)) as h:
        with torch.no_grad():
            for t in TIMESTEPS:
                m(**example_inputs(m, t, batch=2, seed=1))
                m(**example_inputs(m, t, batch=4, seed=2))
        assert h.stats()["recomputed_steps"] == [0, 1, 2, 3]
        first = h.state.tracker.trajectory
        with torch.no_grad():
            m(**example_inputs(m, 300.0, batch=2, seed=1))  # seen at this timestep already: a restart
        assert h.state.tracker.trajectory == first + 1 and h.stats()["recomputed_steps"] == [0]


def test_a_trajectory_fingerprints_its_conditioning_once(monkeypatch):
    """A conditioning tensor passed unchanged to every step is fingerprinted on the first call only (the
    fingerprint reads value sums on the host); the static schedule is worked out once per step and grid."""
    from mmskip.diffusion import tracker
    from mmskip.diffusion.inheritance import state as state_mod

    m, labels = tiny_dit(), torch.tensor([1, 3])
    keys, plans = Counter(), Counter()
    real_key, real_plan = tracker.call_key, state_mod.step_computes
    monkeypatch.setattr(tracker, "call_key", lambda *a: keys.update(["key"]) or real_key(*a))
    monkeypatch.setattr(state_mod, "step_computes", lambda s, step, n: plans.update([step]) or real_plan(s, step, n))

    def run(shared):
        with applied(m, FeatureInheritanceConfig(schedule=interval(2))) as h, torch.no_grad():
            outs = []
            for _ in range(2):  # two trajectories
                for t in TIMESTEPS:
                    kw = dict(example_inputs(m, t), class_labels=labels if shared else labels.clone())
                    outs.append(m(**kw)[0])
            return outs, h.stats()

    fresh, fresh_stats = run(shared=False)  # a new tensor per call: fingerprinted every call
    assert keys["key"] == 2 * len(TIMESTEPS)
    keys.clear()
    plans.clear()
    shared, stats = run(shared=True)
    assert keys["key"] == 1 and all(n == 1 for n in plans.values())
    assert all(torch.equal(a, b) for a, b in zip(shared, fresh, strict=True))
    assert stats["recomputed_steps"] == fresh_stats["recomputed_steps"] == [0, 2]


def test_new_trajectory_resets_cache():
    m = tiny_unet()
    ref = _run(m, TIMESTEPS[:2])
    with applied(m, FeatureInheritanceConfig(schedule=explicit(keep=[0]))):
        _run(m, TIMESTEPS[:2])
        again = _run(m, TIMESTEPS[:2])  # timestep goes back up: a new trajectory, step 0 recomputes
    assert torch.equal(again[0], ref[0])


def test_adaptive_recomputes_when_probe_changes():
    m = tiny_dit()
    with applied(m, FeatureInheritanceConfig(schedule=adaptive(1e9, signal="relative_change"))) as h:
        _run(m)
        never = h.stats()["recomputed_steps"]
    with applied(m, FeatureInheritanceConfig(schedule=adaptive(0.0, signal="relative_change"))) as h:
        _run(m)
        always = h.stats()["recomputed_steps"]
    with applied(m, FeatureInheritanceConfig(schedule=adaptive(1e9, signal="relative_change", warmup=2))) as h:
        _run(m)
        warm = h.stats()["recomputed_steps"]
    assert never == [0] and always == [0, 1, 2, 3] and warm == [0, 1]


def test_nonuniform_schedules():
    s = nonuniform(50, 20, power=2.0)
    keep = s.keep()
    assert len(keep) == 20 and keep[0] == 0 and keep[-1] == 49
    gaps = [b - a for a, b in zip(keep, keep[1:], strict=False)]
    assert gaps[0] <= gaps[-1]  # denser early
    assert nonuniform(10, 5, power=1.0).keep() == (0, 2, 4, 7, 9)
    assert from_changes([0, 5, 0.1, 0.1, 5, 0.1], 3).keep() == (0, 1, 4)
    m = tiny_pixart()
    with applied(m, FeatureInheritanceConfig(schedule=explicit(keep=[0, 1]))) as h:
        _run(m)
        assert h.stats()["recomputed_steps"] == [0, 1]


def test_calibrated_schedule_from_probe_changes():
    """A calibration run (adaptive, threshold 0 = always recompute) measures per-step changes for from_changes()."""
    m = tiny_dit()
    with applied(m, FeatureInheritanceConfig(schedule=adaptive(0.0, signal="relative_change"))) as h:
        _run(m)
        changes = h.stats()["probe_changes"]
    # reference: the probe's (first block's) relative change between consecutive steps, measured by hand
    seen = []
    hook = m.transformer_blocks[0].register_forward_hook(lambda mod, a, out: seen.append(out.detach()))
    _run(m)
    hook.remove()
    manual = [0.0] + [float((v - r).abs().mean() / r.abs().mean()) for r, v in zip(seen, seen[1:], strict=False)]
    assert changes == pytest.approx(manual, rel=1e-6)
    sched = from_changes(changes, 2)
    with applied(m, FeatureInheritanceConfig(schedule=sched)) as h:
        _run(m)
        assert h.stats()["recomputed_steps"] == list(sched.keep())


def test_pipeline_step_count_drives_schedule():
    m = tiny_sd3()
    with applied(m, FeatureInheritanceConfig(schedule=nonuniform(4, 2, power=1.0))) as h:
        h.state.begin(4)
        _run(m)
        assert h.stats()["recomputed_steps"] == [0, 3]


def test_bad_configs_raise_clear_errors():
    m = tiny_dit()
    with pytest.raises(ValueError, match="no module 'transformer_blocks.9'"):
        apply(m, FeatureInheritanceConfig(targets=("transformer_blocks.9",)))
    with pytest.raises(ValueError, match="outside"):
        apply(m, FeatureInheritanceConfig(targets=("transformer_blocks.2:9",)))
    with pytest.raises(ValueError, match="overlap"):
        apply(m, FeatureInheritanceConfig(targets=("transformer_blocks.1:3", "transformer_blocks.2")))
    with pytest.raises(ValueError, match="probe"):
        apply(m, FeatureInheritanceConfig(schedule=adaptive(0.1, "relative_change"), targets=("transformer_blocks.0",)))
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        FeatureInheritanceConfig(schedule=interval(0))
    with pytest.raises(ValueError, match="granularity"):
        FeatureInheritanceConfig(granularity="pixel")
    with pytest.raises(ValueError, match="signal"):
        FeatureInheritanceConfig(schedule=adaptive(0.1, "router"))
    with pytest.raises(UnsupportedModelError, match="UNet2DConditionModel"):
        apply(torch.nn.Linear(2, 2), FeatureInheritanceConfig())
    assert not hasattr(m, "_diffusers_hook") or not m._diffusers_hook.hooks  # failed applies left nothing


def test_config_json_round_trip():
    cfg = FeatureInheritanceConfig(schedule=nonuniform(50, 20), granularity="layer", targets=("transformer_blocks.1",))
    back = SkipConfig.from_dict(cfg.to_json())
    assert back == cfg


def test_bfloat16_model():
    m = tiny_dit().to(torch.bfloat16)
    ref = []
    with torch.no_grad():
        for t in TIMESTEPS:
            kw = example_inputs(m, t)
            kw["hidden_states"] = kw["hidden_states"].to(torch.bfloat16)
            ref.append(m(**kw)[0])
        with applied(m, FeatureInheritanceConfig(schedule=interval(2))) as h:
            out = []
            for t in TIMESTEPS:
                kw = example_inputs(m, t)
                kw["hidden_states"] = kw["hidden_states"].to(torch.bfloat16)
                out.append(m(**kw)[0])
            assert h.stats()["recomputed_steps"] == [0, 2]
    assert out[1].dtype == torch.bfloat16 and torch.equal(out[0], ref[0])
