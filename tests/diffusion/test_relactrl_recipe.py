"""The zoo recipes for scenes-flux-controlnet and scenes-flux-relactrl, end to end at toy size."""

from __future__ import annotations

import json

import torch
from mmskip.diffusion.relactrl import RelaCtrlFluxNet, RelevanceReport
from mmskip.diffusion.relactrl.recipe import (
    SAMPLING,
    load_pipeline,
    train_scenes_controlnet,
    train_scenes_relactrl,
)


def test_recipes_train_measure_analyse_and_save(tmp_path, monkeypatch):
    monkeypatch.setitem(SAMPLING, "num_inference_steps", 2)
    torch.set_num_threads(1)
    cn = train_scenes_controlnet(tmp_path / "scenes-flux-controlnet", steps=2, batch=4, device="cpu", relevance_n=4,
                                 eval_n=4, n_train=40)
    folder = tmp_path / "scenes-flux-controlnet"
    report = RelevanceReport.load(folder / "relevance.json")
    assert len(report.positions) == 6 and (folder / "relevance.png").is_file() and not (folder / "run").exists()
    assert {"FID", "silhouette IoU", "prompt accuracy (exact)"} <= set(cn)
    assert json.loads((folder / "train_info.json").read_text())["steps"] == 2
    rc = train_scenes_relactrl(tmp_path / "scenes-flux-relactrl", steps=2, batch=4, device="cpu", eval_n=4,
                               n_train=40, num_blocks=2)
    pipe = load_pipeline(tmp_path / "scenes-flux-relactrl")
    assert isinstance(pipe.controlnet, RelaCtrlFluxNet)
    assert [p.index for p in pipe.controlnet.control_positions()] == sorted(
        i for _, i in sorted(zip(report.scores, report.indices, strict=True), reverse=True)[:2])
    assert rc["control-branch parameters"] < cn["control-branch parameters"] / 4
    assert "Reproduce" in (tmp_path / "scenes-flux-relactrl" / "README.md").read_text()
