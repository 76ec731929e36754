"""Stock inputs of the zoo's text-to-image pipelines: captions with disjoint seeds per range."""

from mmskip.zoo.data import caption
from mmskip.zoo.prompts import zoo_inputs


def test_digits_sd_inputs_are_captions_with_disjoint_seeds():
    calib, held = zoo_inputs("digits-sd", 4), zoo_inputs("digits-sd", 12, offset=4)
    assert [x["prompt"] for x in calib] == [caption(i) for i in range(4)]
    assert not {x["seed"] for x in calib} & {x["seed"] for x in held}


def test_scenes_flux_inputs_are_held_out_captions():
    xs = zoo_inputs("scenes-flux", 3, offset=2)
    assert [x["seed"] for x in xs] == [2, 3, 4] and all(isinstance(x["prompt"], str) and x["prompt"] for x in xs)
    assert zoo_inputs("scenes-flux", 5)[2:] == xs


def test_models_with_their_own_stock_inputs_get_none():
    assert zoo_inputs("stdlib-lm", 3) is None


def test_digits_dit_inputs_stay_on_the_ten_trained_classes():
    """Regression: the target's generic class labels ran past 9 into untrained embeddings (held-out PSNR 22
    dB where calibration gave 33 dB for the same setting)."""
    xs = zoo_inputs("digits-dit", 16, offset=8)
    assert all(0 <= x["class_labels"][0] <= 9 for x in xs) and [x["seed"] for x in xs] == list(range(8, 24))


def test_scenes_flux_inputs_run_on_the_zoo_pipeline():
    """Regression: without the zoo's prompt length the tokenizer's 512 overflowed the 16-position text encoder."""
    from mmskip import zoo
    from mmskip.tuning import make_target

    target = make_target(zoo.load("scenes-flux"), steps=2)
    images = target.run(target.check_inputs(zoo_inputs("scenes-flux", 2), "inputs"))
    assert len(images) == 2 and images[0].shape[-1] == 32
