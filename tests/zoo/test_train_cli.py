"""``mmskip zoo`` (recipes/zoo.py): argument parsing only (nothing is trained here)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from mmskip import zoo
from mmskip.cli import recipe

train = recipe("zoo")


def test_default_output_is_a_new_runs_folder_not_the_shipped_model():
    a = train.parse_args(["stdlib-lm"])
    assert a.folder == Path("runs/zoo/stdlib-lm")
    assert zoo.MODELS_DIR not in a.folder.resolve().parents


def test_writing_into_the_package_needs_an_explicit_flag_or_out(tmp_path):
    assert train.parse_args(["digits-vae", "--overwrite-shipped"]).folder == zoo.MODELS_DIR / "digits-vae"
    target = zoo.MODELS_DIR / "digits-vae"
    assert train.parse_args(["digits-vae", "--out", str(target)]).folder == target
    assert train.parse_args(["digits-vae", "--out", str(tmp_path)]).folder == tmp_path


def test_out_and_overwrite_shipped_together_and_unknown_names_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["digits-vae", "--out", "x", "--overwrite-shipped"])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["nope"])
    with pytest.raises(ValueError, match="unknown zoo model 'nope'"):
        train.train("nope")


def test_train_passes_the_chosen_folder_to_the_recipe(monkeypatch):
    seen = {}
    fake = types.ModuleType("fake_recipe")
    fake.recipe = lambda out, **kw: seen.update(out=out, **kw) or {}
    monkeypatch.setitem(sys.modules, "fake_recipe", fake)
    monkeypatch.setitem(train.RECIPES, "digits-vae", ("fake_recipe", "recipe"))
    train.train("digits-vae", steps=3)
    assert seen == {"out": Path("runs/zoo/digits-vae"), "steps": 3}
    train.train("digits-vae", overwrite_shipped=True)
    assert seen["out"] == zoo.MODELS_DIR / "digits-vae"
