"""The procedural scenes: seeded, captions say what is drawn."""

from __future__ import annotations

import numpy as np
import pytest

from mmskip.zoo.scenes_data import COLORS, Group, Scene, caption, make_split, render


def test_splits_are_rebuilt_identically_and_differ():
    a, ca, sa = make_split("train", 12)
    b, cb, sb = make_split("train", 12)
    assert np.array_equal(a, b) and ca == cb and sa == sb
    c, cc, _ = make_split("test", 12)
    assert not np.array_equal(a, c) and ca != cc
    assert a.shape == (12, 32, 32, 3) and a.dtype == np.uint8
    assert all(caption(s) == t for s, t in zip(sa, ca, strict=True))
    with pytest.raises(ValueError, match="split must be"):
        make_split("dev", 1)


def test_captions_and_layout():
    s = Scene(Group(2, "red", "circle"), Group(1, "blue", "square"), "left of")
    assert caption(s) == "two red circles left of a blue square"
    img = render(s, np.random.default_rng(0)).astype(float)
    red = np.array(COLORS["red"], float)
    blue = np.array(COLORS["blue"], float)

    def near(c):
        return np.linalg.norm(img - c, axis=-1) < 60

    xs_red, xs_blue = np.nonzero(near(red))[1], np.nonzero(near(blue))[1]
    assert len(xs_red) and len(xs_blue)
    assert xs_red.max() < 16 <= xs_blue.min()  # the red group is in the left half, the blue one in the right


def test_classifier_targets_and_prompt_accuracy():
    import torch

    from mmskip.zoo.scenes_classifier import HEADS, ScenesClassifier, prompt_accuracy, scene_targets

    one = Scene(Group(3, "green", "triangle"))
    two = Scene(Group(1, "red", "square"), Group(2, "blue", "circle"), "above")
    t = scene_targets([one, two])
    assert t["relation"].tolist() == [0, 2] and t["color2"].tolist() == [-100, 2] and t["count1"].tolist() == [2, 0]
    torch.manual_seed(0)
    model = ScenesClassifier().eval()
    with torch.no_grad():  # make the heads answer the targets of `two` whatever the image
        for k, head in model.heads.items():
            head.weight.zero_()
            head.bias.zero_()
            head.bias[t[k][1] if t[k][1] >= 0 else 0] = 10.0
    acc = prompt_accuracy(model, torch.zeros(2, 3, 32, 32), [one, two])
    assert set(acc) == {*HEADS, "exact"}
    assert acc["exact"] == 0.5 and acc["color2"] == 1.0 and acc["relation"] == 0.5


def test_shipped_scenes_models_read_and_reconstruct_heldout_scenes():
    import torch

    from mmskip import zoo
    from mmskip.cli import recipe
    from mmskip.zoo.scenes_classifier import prompt_accuracy
    from mmskip.zoo.scenes_data import scenes_tensor

    psnr_unit = recipe("vae").psnr_unit

    images, _, scenes = make_split("test", 200)
    x = scenes_tensor(images)
    acc = prompt_accuracy(zoo.load("scenes-classifier"), x, scenes)
    assert acc["exact"] > 0.75 and min(acc[k] for k in ("color1", "shape1", "relation")) > 0.9
    vae = zoo.load("scenes-vae")
    with torch.no_grad():
        rec = vae.decode(vae.encode(x[:64]).latent_dist.mode()).sample
    assert psnr_unit(rec, x[:64]) > 28


def test_shipped_scenes_flux_generates_with_the_drop_in():
    import torch
    from mmskip.diffusion import FeatureInheritanceConfig
    from mmskip.pipelines import SkipFluxPipeline

    from mmskip import zoo
    from mmskip.schedules import interval

    pipe = SkipFluxPipeline.from_pretrained(zoo.path("scenes-flux"), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_skip(FeatureInheritanceConfig(interval(2)))
    img = pipe(["two red circles"], height=32, width=32, num_inference_steps=4, max_sequence_length=16,
               generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert img.shape == (1, 3, 32, 32) and torch.isfinite(img).all()
    assert pipe.skip_stats()["recomputed_steps"] == [0, 2]
