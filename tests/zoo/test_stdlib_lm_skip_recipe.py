"""The ``stdlib-lm-skip`` recipe: compute matched to ``stdlib-lm``, runs end to end (a few steps)."""

import json

import torch
from transformers import AutoModelForCausalLM

from mmskip.cli import recipe
from mmskip.zoo.stdlib_data import read_texts

_recipe = recipe("stdlib_lm_skip")
RECIPE, matched_steps, train_stdlib_lm_skip = _recipe.RECIPE, _recipe.matched_steps, _recipe.train_stdlib_lm_skip


def test_matched_steps_equal_stdlib_lm_compute():
    assert matched_steps(16, 128, 4096, None) == 800  # stdlib-lm's own architecture and steps
    cheaper = matched_steps(RECIPE["layers"], RECIPE["d"], 4096, RECIPE["rotation"])
    exits = (RECIPE["layers"] - 1) / RECIPE["rotation"]
    macs = RECIPE["layers"] * 16 * RECIPE["d"] ** 2 + 4096 * RECIPE["d"] * (1 + exits)
    assert abs(cheaper * macs - 800 * 4.72e6) / (800 * 4.72e6) < 1e-3


def test_recipe_runs_and_saves_a_loadable_model(tmp_path):
    texts = (read_texts("train")[:4], read_texts("test")[:1])
    metrics = train_stdlib_lm_skip(tmp_path, steps=2, device="cpu", texts=texts, write_card=False, layers=4, d=32,
                                   schedule_aware_steps=2)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.num_hidden_layers == 4 and metrics["steps"] == 2 and metrics["schedule-aware steps"] == 2
    info = json.loads((tmp_path / "train_info.json").read_text())
    assert [o.split("(")[0] for o in info["objectives"]] == ["ScheduleAware", "LayerDropout", "EarlyExitLoss"]
    assert len(info["history"]) >= 1 and info["stage2"]["config"]["steps"] == 2


def test_stage_two_starts_from_saved_stage_one_weights(tmp_path):
    """``init``: stage 1 is not run; stage 2 trains the saved weights, and 0 steps leaves them as saved."""
    texts = (read_texts("train")[:4], read_texts("test")[:1])
    kw = dict(steps=2, device="cpu", texts=texts, write_card=False, layers=4, d=32)
    assert "schedule-aware steps" not in train_stdlib_lm_skip(tmp_path / "s1", schedule_aware_steps=0, **kw)
    first = AutoModelForCausalLM.from_pretrained(tmp_path / "s1").state_dict()
    train_stdlib_lm_skip(tmp_path / "copy", init=tmp_path / "s1", schedule_aware_steps=0, **kw)
    train_stdlib_lm_skip(tmp_path / "s2", init=tmp_path / "s1", schedule_aware_steps=2, **kw)
    copy = AutoModelForCausalLM.from_pretrained(tmp_path / "copy").state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "s2").state_dict()
    assert all(torch.equal(first[k], copy[k]) for k in first)
    assert any(not torch.equal(first[k], tuned[k]) for k in first)
    info = json.loads((tmp_path / "s2" / "train_info.json").read_text())
    assert info["objectives"][0].startswith("ScheduleAware") and info["stage2"]["config"]["steps"] == 2
