"""A saved Skip pipeline loads from anywhere: the Gaussian stats travel with the folder; and
``skip_config=[]`` loads a folder without its saved configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mmskip.diffusion import FeatureInheritanceConfig, GaussianStats, GaussianTeleportConfig, StepSkipConfig
from mmskip.pipelines import SKIP_CONFIG_NAME, SkipDiTPipeline
from mmskip.pipelines.mixin import load_skip_configs

from mmskip.schedules import interval

from ..diffusion._tiny import tiny_pipeline_components


def _call(pipe, kw, seed=0):
    return torch.as_tensor(np.asarray(pipe(generator=torch.Generator().manual_seed(seed), **kw)[0]))


def _pipe():
    comps, kw = tiny_pipeline_components("dit")
    pipe = SkipDiTPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe, kw


def _load(folder, **extra):
    pipe = SkipDiTPipeline.from_pretrained(folder, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_relative_stats_path_is_copied_into_the_saved_folder(tmp_path, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    GaussianStats.fit(torch.randn(32, 4, 8, 8, generator=torch.Generator().manual_seed(5)), rank=6).save("stats.safetensors")
    pipe, kw = _pipe()
    configs = [GaussianTeleportConfig("stats.safetensors", 0.34), StepSkipConfig(interval(2, offset=2))]
    pipe.enable_skip(configs)
    out = _call(pipe, kw)
    pipe.save_pretrained("saved")
    pipe.save_pretrained("saved")  # saving again over the same folder copies the stats again, harmlessly
    saved = work / "saved"
    stored = json.loads((saved / SKIP_CONFIG_NAME).read_text())["configs"][0]
    assert stored["stats_path"] == "mmskip_gaussian_stats.safetensors"
    assert (saved / stored["stats_path"]).read_bytes() == (work / "stats.safetensors").read_bytes()
    assert pipe.skip_configs == tuple(configs)  # the enabled config is unchanged

    monkeypatch.chdir(elsewhere)  # from another working directory, by absolute and by relative path
    for folder in (saved, "../work/saved"):
        again = _load(folder)
        assert again.skip_configs[0].stats_path == str((saved / stored["stats_path"]).resolve())
        assert again.skip_configs[1:] == tuple(configs[1:])
        assert torch.equal(_call(again, kw), out)
    (work / "stats.safetensors").unlink()  # the folder does not need the original file
    assert torch.equal(_call(_load(saved), kw), out)
    # a folder saved the old way (relative to the working directory) still loads from there
    old = dict(stored, stats_path="stats_elsewhere.safetensors")
    (saved / SKIP_CONFIG_NAME).write_text(json.dumps({"configs": [old]}))
    assert load_skip_configs(saved)[0].stats_path == "stats_elsewhere.safetensors"


def test_saving_refuses_a_stats_file_deleted_after_enabling_before_writing(tmp_path):
    path = tmp_path / "stats.safetensors"
    GaussianStats.fit(torch.randn(16, 4, 8, 8), rank=4).save(path)
    pipe, _ = _pipe()
    pipe.enable_skip(GaussianTeleportConfig(str(path), 0.34))
    path.unlink()
    with pytest.raises(FileNotFoundError, match="no stats file"):
        pipe.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


@pytest.mark.parametrize("none", [[], ()])
def test_skip_config_empty_loads_without_the_saved_configs(tmp_path, none):
    pipe, kw = _pipe()
    plain = _call(pipe, kw)
    pipe.enable_skip(FeatureInheritanceConfig(interval(2)))
    fast = _call(pipe, kw)
    pipe.save_pretrained(tmp_path)
    bare = _load(tmp_path, skip_config=none)
    assert not bare.skip_enabled and bare.skip_configs == ()
    assert torch.equal(_call(bare, kw), plain)
    assert torch.equal(_call(_load(tmp_path), kw), fast) and not torch.equal(fast, plain)


def test_deepcopy_of_an_enabled_skip_pipeline_is_an_independent_copy():
    """copy.deepcopy of a Skip pipeline with skipping enabled (it holds a call guard with a lock)
    gives a copy that skips the same way, with its own guard."""
    import copy

    from mmskip.pipelines import SkipStableDiffusionPipeline

    comps, kw = tiny_pipeline_components("sd")
    pipe = SkipStableDiffusionPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_skip(FeatureInheritanceConfig(interval(2)))
    want = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    clone = copy.deepcopy(pipe)
    assert torch.equal(clone(generator=torch.Generator().manual_seed(0), **kw).images, want)
    assert clone.unet is not pipe.unet
    clone.disable_skip()
    assert torch.equal(pipe(generator=torch.Generator().manual_seed(0), **kw).images, want)
