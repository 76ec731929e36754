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
