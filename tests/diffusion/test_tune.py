"""mmskip.tune on diffusers pipelines: the fewer-steps front, the held-out floor, save/load/apply,
exact restoration, content seeds, declared spaces, diffusers' caches as peers, bad input."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from mmskip.diffusion import FeatureInheritanceConfig, StepSkipConfig
from mmskip.diffusion.sampler_names import sampler_name
from mmskip.diffusion.tune_target import PipelineTarget
from mmskip.pipelines import SkipDiTPipeline, SkipFluxPipeline, load_skip_configs

import mmskip
from mmskip.schedules import interval
from mmskip.tuning import Candidate, TuneError, TuneResult, UnsupportedTargetError
from mmskip.tuning.trial_log import LOG_NAME

from ._tiny import tiny_pipeline_components
from ._tiny_families import tiny_family_pipeline_components

pytest.importorskip("optuna")
pytest.importorskip("torchmetrics")

STEPS = 4
FAST = dict(steps=STEPS, guidance_scale=3.0, repeats=3, finalists=2, progress=False)


def _dit(plain: bool = False):
    comps, _ = tiny_pipeline_components("dit")
    if plain:
        from diffusers import DiTPipeline

        return DiTPipeline(**comps)
    return SkipDiTPipeline(**comps)


def _images(pipe, labels=(1, 5)):
    return PipelineTarget(pipe, steps=STEPS, guidance_scale=3.0).run(list(labels))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    pipe = _dit()
    sched, before = pipe.scheduler, _images(pipe)
    folder = tmp_path_factory.mktemp("tune")
    result = mmskip.tune(pipe, [1, 2], held_out=[5, 7], floor=20.0, budget=3, out=folder, **FAST)
    return pipe, sched, before, folder, result


def test_best_meets_the_floor_on_held_out_and_the_front_is_measured(tuned):
    pipe, _, _, folder, r = tuned
    base = r.measured[0]
    assert base.candidate.family == "baseline" and base.quality["psnr"] == 100.0  # identical images: finite, capped
    assert r.metric == "psnr" and r.best_measured.quality["psnr"] >= 20.0
    assert "ssim" in r.best_measured.quality
    assert r.best.family == "baseline" or r.best_measured.speedup == max(m.speedup for m in r.measured[1:])
    assert any(m.candidate.family == "fewer-steps" for m in r.measured)
    fixed = [json.loads(x) for x in (folder / LOG_NAME).read_text().splitlines()[1:]]
    fixed = [x for x in fixed if x["kind"] == "fixed"]
    target = PipelineTarget(pipe, steps=STEPS)
    assert {(c["candidate"]["settings"]["sampler"], c["candidate"]["settings"]["num_inference_steps"]) for c in fixed} \
        == {(s, n) for s in target.samplers for n in (2, 3)}
    assert all(x["candidate"]["family"] == "fewer-steps" for x in fixed)
    trials = [json.loads(x) for x in (folder / LOG_NAME).read_text().splitlines()[1:]]
    first = next(x for x in trials if x["kind"] == "trial")  # the declared seeds go first
    assert first["params"]["feature_inheritance.schedule"] == "interval:2" and first.get("q") is not None
    assert target.samplers[0] == "ddim" and {"dpm++2m", "euler", "unipc"} <= set(target.samplers)


def test_tuning_restores_the_pipeline_exactly(tuned):
    pipe, sched, before, _, _ = tuned
    assert pipe.scheduler is sched and not pipe.skip_enabled
    assert torch.equal(before, _images(pipe))
    assert not getattr(pipe.transformer, "_diffusers_hook", None) or not pipe.transformer._diffusers_hook._hooks


def test_result_save_load_round_trips(tuned, tmp_path):
    *_, r = tuned
    r.save(tmp_path)
    back = TuneResult.load(tmp_path)
    assert json.dumps(back.to_dict(), sort_keys=True, default=str) == json.dumps(r.to_dict(), sort_keys=True,
                                                                                default=str)
    with_config = dataclasses.replace(r, best=Candidate((FeatureInheritanceConfig(interval(2)),),
                                                        {"num_inference_steps": 3, "sampler": "dpm++2m"}))
    with_config.save(tmp_path / "fi")
    assert mmskip.SkipConfig.from_pretrained(tmp_path / "fi") == with_config.best.configs[0]
    assert load_skip_configs(tmp_path / "fi") == list(with_config.best.configs)


def test_a_saved_result_carries_the_files_its_configs_read(tuned, tmp_path):
    """A tuned Gaussian jump names a stats file: the saved folder gets a copy and loads without the original."""
    from mmskip.diffusion import GaussianStats, GaussianTeleportConfig

    *_, r = tuned
    stats = GaussianStats.fit(torch.randn(16, 4, 4, 4, generator=torch.Generator().manual_seed(1)), rank=2)
    original = stats.save(tmp_path / "elsewhere" / "stats.safetensors")
    jump = GaussianTeleportConfig(str(original), 0.2)
    best = Candidate((FeatureInheritanceConfig(interval(2)), jump), {"num_inference_steps": 8})
    dataclasses.replace(r, best=best).save(tmp_path / "tuned")
    original.unlink()
    fi, loaded = load_skip_configs(tmp_path / "tuned")
    assert fi == best.configs[0] and loaded.skip_fraction == 0.2
    assert Path(loaded.stats_path).parent == tmp_path / "tuned" and loaded.load_stats().mean.shape == stats.mean.shape
    alone = dataclasses.replace(r, best=Candidate((jump,), {"num_inference_steps": 8}))
    stats.save(original)
    alone.save(tmp_path / "alone")
    original.unlink()
    assert mmskip.SkipConfig.from_pretrained(tmp_path / "alone").load_stats().mean.shape == stats.mean.shape


def test_apply_enables_the_configs_and_sampler_and_returns_the_call_kwargs(tuned):
    *_, r = tuned
    fi = FeatureInheritanceConfig(interval(2), measure_flops=False)
    best = dataclasses.replace(r, best=Candidate((fi,), {"num_inference_steps": 3, "sampler": "dpm++2m"}))
    pipe = _dit()
    assert best.apply(pipe) == {"num_inference_steps": 3}
    assert pipe.skip_configs == (fi,) and sampler_name(pipe.scheduler) == "dpm++2m"
    plain = _dit(plain=True)
    with pytest.raises(TypeError, match="SkipDiTPipeline"):
        best.apply(plain)
    assert sampler_name(plain.scheduler) == "ddim"  # nothing changed
    steps_only = dataclasses.replace(r, best=Candidate((), {"num_inference_steps": 2, "sampler": "euler"}))
    assert steps_only.apply(plain) == {"num_inference_steps": 2} and sampler_name(plain.scheduler) == "euler"


def test_a_plain_pipeline_is_tuned_through_its_drop_in_and_left_unchanged():
    plain = _dit(plain=True)
    sched = plain.scheduler
    target = PipelineTarget(plain, steps=STEPS)
    assert isinstance(target.pipe, SkipDiTPipeline) and target.pipe is not plain
    assert target.pipe.transformer is plain.transformer
    cand = Candidate((StepSkipConfig(interval(2)),), {"num_inference_steps": STEPS, "sampler": "dpm++2m"})
    with target.applied(cand):
        target.run([3])
    assert plain.scheduler is sched and target.pipe.scheduler is sched


def test_applied_restores_configs_the_user_had_enabled():
    pipe = _dit()
    mine = FeatureInheritanceConfig(interval(3))
    pipe.enable_skip(mine)
    target = PipelineTarget(pipe, steps=STEPS)
    with target.applied(target.baseline()):
        assert not pipe.skip_enabled
    with target.applied(Candidate((StepSkipConfig(interval(2)),), {"num_inference_steps": STEPS, "sampler": "euler"})):
        assert pipe.skip_configs == (StepSkipConfig(interval(2)),)
    assert pipe.skip_configs == (mine,) and sampler_name(pipe.scheduler) == "ddim"


def test_each_input_has_its_own_seed_so_splitting_never_changes_an_image():
    target = PipelineTarget(_dit(), steps=2)
    both = target.run([1, 2])
    assert torch.equal(both[1:], target.run([2])) and not torch.equal(both[0], both[1])
    assert both.shape == (2, 3, 16, 16) and 0.0 <= float(both.min()) and float(both.max()) <= 1.0
    calib, held = target.default_inputs(3), target.default_inputs(2, offset=3)
    assert calib == [{"class_labels": [i], "seed": i} for i in range(3)] and held[0] == {"class_labels": [3], "seed": 3}
    seeded = target.run([{"class_labels": [1], "seed": 3}, {"class_labels": [1], "seed": 4}])
    assert torch.equal(seeded[:1], target.run([{"class_labels": [1], "seed": 3}]))
    assert not torch.equal(seeded[0], seeded[1])  # same label, own seeds: independent samples


def test_declared_spaces_build_for_the_sampled_step_count():
    target = PipelineTarget(_dit(), steps=10)
    spaces = {s.technique: s for s in target.spaces()}
    assert {"feature_inheritance", "step_skip"} <= set(spaces) and "gaussian_teleport" not in spaces
    assert not any(s.family.startswith("diffusers-") for s in spaces.values())  # DiT is no CacheMixin
    fi = spaces["feature_inheritance"]
    assert set(fi.params["targets"].values) == {"default", "deep", "all"}
    assert [(d["targets"], d["num_inference_steps"], d["sampler"]) for d in fi.seeds] == [("all", 5, "ddim"),
                                                                                         ("deep", 5, "ddim")]
    assert fi.build(fi.seeds[0]).schedule == interval(2)
    cfg = fi.build({"num_inference_steps": 6, "schedule": "nonuniform:0.5", "targets": "all", "granularity": "block"})
    cfg.validate(6)
    assert cfg.targets == ("transformer_blocks.0:4",)
    with pytest.raises(ValueError):
        fi.build({"num_inference_steps": 3, "schedule": "interval:4", "targets": "default", "granularity": "layer"})
    skip = spaces["step_skip"].build({"num_inference_steps": 8, "keep_fraction": 0.5, "power": 1.5, "sampler": "ddim"})
    assert len(skip.keep(8)) == 4
    with pytest.raises(ValueError, match="unipc"):  # refused before anything runs
        spaces["step_skip"].build({"num_inference_steps": 8, "keep_fraction": 0.5, "power": 1.5, "sampler": "unipc"})
    settings = target.settings_space()
    assert (settings["num_inference_steps"].low, settings["num_inference_steps"].high) == (2, 10)


def test_diffusers_caches_are_peers_on_a_cache_mixin_denoiser():
    comps, call = tiny_family_pipeline_components("flux")
    pipe = SkipFluxPipeline(**comps)
    inputs = [{k: call[k] for k in ("prompt_embeds", "pooled_prompt_embeds")}]
    target = PipelineTarget(pipe, steps=3, height=16, width=16, guidance_scale=3.5)
    assert target.samplers == ("flow-euler",)  # flow matching: its own sampler only
    spaces = {s.technique: s for s in target.spaces()}
    assert spaces["diffusers-fbc"].family == "diffusers-FirstBlockCache"
    settings = spaces["diffusers-fbc"].build({"num_inference_steps": 3, "threshold": 0.2})
    cand = Candidate((), {"num_inference_steps": 3, "sampler": "flow-euler", **settings}, "diffusers-FirstBlockCache")
    with target.applied(target.baseline()):
        ref = target.run(inputs)
    with target.applied(cand):
        assert pipe.transformer.is_cache_enabled
        out = target.run(inputs)
    assert not pipe.transformer.is_cache_enabled and out.shape == ref.shape
    assert target.quality(ref, ref)["psnr"] == 100.0


@pytest.mark.parametrize(("inputs", "error", "match"), [
    ([], ValueError, "empty"),
    (1, TypeError, "list of"),
    (["a digit"], TypeError, "takes no prompt"),
    ([{"generator": None}], ValueError, "set by the tuner"),
    ([{"not_an_argument": 1}], ValueError, "takes no"),
    ([1.5], TypeError, "float"),
    ([{"class_labels": [1], "seed": "x"}], TypeError, "seed"),
])
def test_bad_inputs_get_clear_errors(inputs, error, match):
    with pytest.raises(error, match=match):
        mmskip.tune(_dit(), inputs, held_out=[1], budget=1, **FAST)


def test_bad_options_and_unsupported_pipelines():
    with pytest.raises(ValueError, match="flow matching"):
        PipelineTarget(SkipFluxPipeline(**tiny_family_pipeline_components("flux")[0]), samplers=["dpm++2m"])
    with pytest.raises(ValueError, match="unknown sampler"):
        PipelineTarget(_dit(), samplers=["no-such"])
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 8), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    with pytest.raises(UnsupportedTargetError, match="DDPMPipeline"):
        mmskip.tune(DDPMPipeline(unet=unet, scheduler=DDPMScheduler()), [1, 2], budget=1)
    with pytest.raises(TuneError):
        mmskip.tune(_dit(), [1, 2], budget=0, **FAST)


def test_a_model_level_and_a_sampler_level_technique_are_tried_together(tmp_path):
    from mmskip.diffusion import GaussianStats

    pipe = _dit()
    cfg = pipe.transformer.config
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(32, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    stats = str(GaussianStats.fit(latents, rank=4).save(tmp_path / "stats.safetensors"))
    target = PipelineTarget(pipe, steps=8, guidance_scale=3.0, gaussian_stats=stats)
    both = {s.technique: s for s in target.spaces()}["feature_inheritance+gaussian_teleport"]
    fi, gt = both.build({**both.seeds[0], "sampler": "ddim"})
    assert isinstance(fi, FeatureInheritanceConfig) and gt.skip_fraction == 0.2 and fi.schedule == interval(2)
    mmskip.tune(target, [1, 2], held_out=[5, 7], floor=0.0, budget=5, out=tmp_path / "log", repeats=3, finalists=2,
                progress=False)
    rows = [json.loads(x) for x in (tmp_path / "log" / LOG_NAME).read_text().splitlines()[1:]]
    paired = [r for r in rows if r.get("group") == "feature_inheritance+gaussian_teleport"]
    assert paired and paired[0]["q"] is not None, rows  # the seed pair ran: both configs enabled together
    assert [c["technique"] for c in paired[0]["candidate"]["configs"]] == ["feature_inheritance", "gaussian_teleport"]
    alone = [r for r in rows if r.get("group") == "feature_inheritance" and r.get("q") is not None
             and r["candidate"]["settings"] == paired[0]["candidate"]["settings"]
             and r["candidate"]["configs"][0] == paired[0]["candidate"]["configs"][0]]
    if alone:  # the same inheritance at the same steps costs more without the jump over the first steps
        assert paired[0]["cost"] < alone[0]["cost"]
