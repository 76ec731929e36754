"""The ``stdlib-lm-skip`` recipe: compute matched to ``stdlib-lm``, runs end to end (a few steps)."""

import json

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
    metrics = train_stdlib_lm_skip(tmp_path, steps=2, device="cpu", texts=texts, write_card=False, layers=4, d=32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.num_hidden_layers == 4 and metrics["steps"] == 2
    info = json.loads((tmp_path / "train_info.json").read_text())
    assert info["objectives"][0].startswith("LayerDropout") and info["objectives"][1].startswith("EarlyExitLoss")
