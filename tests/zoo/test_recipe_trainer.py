"""The zoo recipes train with the one loop (``mmskip.train.fit``): no recipe keeps its own loop, the
OneCycleLR they used is matched by ``recipes/_fit.one_cycle``, and a short run writes the same files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from mmskip.cli import recipe
from mmskip.train.loop import _lr_factor

REPO = Path(__file__).resolve().parents[2]


def test_no_recipe_keeps_its_own_training_loop():
    for path in sorted((REPO / "recipes").glob("*.py")):
        text = path.read_text()
        assert not re.search(r"\.backward\(\)", text), f"{path.name} calls .backward(): train with mmskip.train.fit"
        assert "lr_scheduler.OneCycleLR(" not in text, path.name
        assert "torch.optim.AdamW(" not in text, path.name


@pytest.mark.parametrize(("steps", "pct"), [(1500, 0.3), (900, 0.05), (3500, 0.03), (1200, 0.05)])
def test_one_cycle_matches_the_one_cycle_lr_it_replaces(steps, pct):
    cfg = recipe("_fit").one_cycle(steps, 1e-3, pct_start=pct)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=pct)
    old, new = [], []
    for s in range(steps):
        old.append(opt.param_groups[0]["lr"] / 1e-3)
        new.append(_lr_factor(cfg, s))
        opt.step()
        ref.step()
    old, new = torch.tensor(old), torch.tensor(new)
    assert old.argmax() == new.argmax() and new.max() == pytest.approx(1.0)  # same peak at the same step
    assert new[-1] < 1e-3 and old[-1] < 1e-3  # both anneal to ~0
    assert (old - new).abs().mean() < 0.03  # linear vs cosine warm-up is the only real difference
    assert cfg.betas == (0.9, 0.999) and cfg.max_grad_norm == 0.0 and cfg.lr_schedule == "cosine_after_warmup"


def test_ema_copies_hold_the_loops_ema_and_leave_the_model_alone():
    fit_mod = recipe("_fit")
    net = torch.nn.Linear(3, 2)
    ema = {f"net.{n}": torch.full_like(p, 0.5) for n, p in net.named_parameters()}
    copies = fit_mod.ema_copies({"net": net}, ema)
    assert all(torch.equal(p, torch.full_like(p, 0.5)) for p in copies["net"].parameters())
    assert not any(torch.equal(p, torch.full_like(p, 0.5)) for p in net.parameters())
    assert not copies["net"].training and not any(p.requires_grad for p in copies["net"].parameters())
    with pytest.raises(ValueError):
        fit_mod.ema_copies({"net": net}, None)


def test_classifier_recipe_short_run_writes_its_folder_and_metrics(tmp_path):
    out = tmp_path / "digits-classifier"
    m = recipe("classifier").train_classifier(out, steps=3)
    assert set(m) == {"held-out accuracy", "train accuracy", "parameters"}
    assert {"README.md", "metrics.json", "config.json", "diffusion_pytorch_model.safetensors"} <= {
        p.name for p in out.iterdir()}
    assert json.loads((out / "metrics.json").read_text())["metrics"] == pytest.approx(m)


def test_recipe_batches_are_seeded_by_step():
    fit_mod = recipe("_fit")
    a = torch.rand(4, generator=fit_mod.step_generator(0, 7))
    assert torch.equal(a, torch.rand(4, generator=fit_mod.step_generator(0, 7)))
    assert not torch.equal(a, torch.rand(4, generator=fit_mod.step_generator(0, 8)))
    assert not torch.equal(a, torch.rand(4, generator=fit_mod.step_generator(1, 7)))
