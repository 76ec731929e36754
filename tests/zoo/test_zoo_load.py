"""Each zoo model loads from the repo and gives sane output, quickly."""

from __future__ import annotations

import json

import pytest
import torch

from mmskip import zoo
from mmskip.zoo.data import caption, load_split, to_unit

needs = lambda name: pytest.mark.skipif(name not in zoo.available(), reason=f"zoo model {name} not trained")  # noqa: E731


def test_every_zoo_model_is_present():
    assert zoo.available() == list(zoo.NAMES)


def test_unknown_and_missing_names_say_what_to_do(tmp_path, monkeypatch):
    for fn in (zoo.path, zoo.load):  # load("nope") was a bare KeyError('nope') from the loader table
        with pytest.raises(ValueError) as info:
            fn("nope")
        assert str(info.value) == f"unknown zoo model 'nope'; the zoo has: {', '.join(zoo.NAMES)}"
        assert isinstance(info.value, zoo.UnknownModelError) and not isinstance(info.value, KeyError)
    monkeypatch.setattr(zoo, "MODELS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="mmskip zoo digits-vae --overwrite-shipped"):
        zoo.path("digits-vae")


def test_split_is_fixed_and_disjoint():
    xtr, ytr = load_split("train")
    xte, yte = load_split("test")
    assert xtr.shape == (1497, 1, 32, 32) and xte.shape == (300, 1, 32, 32)
    assert xtr.min() == -1 and xtr.max() == 1 and xte.min() == -1 and xte.max() == 1  # blank paper, full ink
    assert torch.equal(load_split("test")[1], yte)
    # no held-out image appears in the train split
    d = torch.cdist(xte.flatten(1), xtr.flatten(1)).min(1).values
    assert (d > 0).float().mean() > 0.99


@needs("digits-classifier")
def test_classifier_classifies_heldout_digits():
    clf = zoo.load("digits-classifier")
    x, y = load_split("test")
    assert (clf.predict(x) == y).float().mean() >= 0.97
    assert clf.features(x[:4]).shape == (4, 128)


@needs("digits-vae")
def test_vae_reconstructs_heldout_digits():
    from mmskip.eval import psnr

    vae = zoo.load("digits-vae")
    x, _ = load_split("test")
    with torch.no_grad():
        z = vae.encode(x[:64]).latent_dist.mode()
        rec = vae.decode(z).sample
    assert z.shape == (64, 4, 8, 8)
    assert psnr(to_unit(rec), to_unit(x[:64])) > 20


def _check_samples(images: torch.Tensor, labels: list[int]) -> None:
    from mmskip.eval import conditional_accuracy

    assert images.shape == (len(labels), 1, 32, 32)
    assert torch.isfinite(images).all() and images.std() > 0.1
    assert conditional_accuracy(images, labels) > 0.3  # chance is 0.1


@needs("digits-dit")
def test_dit_ten_step_samples_show_the_requested_digit():
    from diffusers import DiTPipeline

    pipe = zoo.load("digits-dit")
    assert isinstance(pipe, DiTPipeline) and pipe.get_label_ids(["seven"]) == [7]
    labels = list(range(10)) * 2
    out = pipe(class_labels=labels, num_inference_steps=10, generator=torch.Generator().manual_seed(0),
               output_type="pt")
    _check_samples(out.images, labels)


@needs("digits-sd")
def test_sd_ten_step_samples_follow_the_prompt():
    pipe = zoo.load("digits-sd")
    pipe.set_progress_bar_config(disable=True)
    labels = list(range(10)) * 2
    out = pipe(prompt=[caption(c) for c in labels], num_inference_steps=10, generator=torch.Generator().manual_seed(0),
               output_type="pt")
    _check_samples(out.images, labels)


@needs("digits-sd-assembled")
def test_sd_assembled_is_a_plain_pipeline_with_digits_sd_components():
    from diffusers import StableDiffusionPipeline

    light, full = zoo.load("digits-sd-assembled"), zoo.load("digits-sd")
    assert isinstance(light, StableDiffusionPipeline) and light.unet.mid_block is None
    assert sum(p.numel() for p in light.unet.parameters()) < sum(p.numel() for p in full.unet.parameters())
    assert all(torch.equal(a, b) for a, b in zip(light.text_encoder.parameters(), full.text_encoder.parameters()))


@needs("digits-clip")
def test_clip_zero_shot_on_heldout_digits():
    import open_clip

    from mmskip.zoo.clip_model import register

    model, preprocess, tokenizer = zoo.load("digits-clip")
    x, y = load_split("test")
    with torch.no_grad():
        txt = torch.nn.functional.normalize(model.encode_text(tokenizer([caption(i) for i in range(10)])), dim=-1)
        img = torch.nn.functional.normalize(model.encode_image(x.repeat(1, 3, 1, 1)), dim=-1)
    assert ((img @ txt.T).argmax(-1) == y).float().mean() >= 0.9
    register()
    assert "digits-clip" in open_clip.list_models()


@needs("stdlib-lm")
def test_stdlib_lm_perplexity_and_generation():
    from mmskip.eval import perplexity
    from mmskip.eval.lm import heldout_ids
    from mmskip.zoo.lm_model import perplexity as card_perplexity

    model, tok = zoo.load("stdlib-lm")
    assert model.config.num_hidden_layers >= 12
    ids = heldout_ids(tok)
    ppl = perplexity(model, ids, seq_len=128, max_windows=8)
    # an independent implementation (the recipe's, from the model's own LM loss) on the same windows
    assert ppl == pytest.approx(card_perplexity(model, ids, seq=128, max_windows=8), rel=1e-5)
    if len(ids) == _card_metrics("stdlib-lm")["held-out tokens"]:  # this Python's stdlib is the card's
        assert ppl == pytest.approx(14.427, rel=1e-3)  # reference value (first 8 x 128 held-out tokens)
    prompt = tok("import os\n\n\ndef ", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=24, do_sample=False)
    text = tok.decode(out[0, prompt.shape[1]:])
    assert "(" in text and text.isascii()


def _card_metrics(name: str) -> dict:
    return json.loads((zoo.path(name) / "metrics.json").read_text())["metrics"]


@pytest.mark.slow
@needs("stdlib-lm")
def test_stdlib_lm_eval_perplexity_reproduces_the_model_card():
    """``python -m mmskip.eval lm``'s default perplexity set is the card's (it used to give 64 vs the card's 95)."""
    from mmskip.eval import perplexity
    from mmskip.eval.lm import MAX_WINDOWS, SEQ_LEN, heldout_ids

    model, tok = zoo.load("stdlib-lm")
    ids = heldout_ids(tok)
    card = _card_metrics("stdlib-lm")
    if len(ids) != card["held-out tokens"]:
        pytest.skip(f"this Python's stdlib gives {len(ids)} held-out tokens, the card's {card['held-out tokens']}")
    ppl = perplexity(model, ids, SEQ_LEN, MAX_WINDOWS)
    assert ppl == pytest.approx(card["held-out perplexity (stdlib modules)"], rel=1e-4)


@needs("digits-sd")
def test_sd_folder_loads_with_defaults_in_one_dtype():
    """``from_pretrained(folder)`` with no dtype argument: every component float32, and it runs."""
    from diffusers import StableDiffusionPipeline
    from mmskip.pipelines import SkipStableDiffusionPipeline

    for cls in (StableDiffusionPipeline, SkipStableDiffusionPipeline):
        pipe = cls.from_pretrained(zoo.path("digits-sd"))
        assert {pipe.text_encoder.dtype, pipe.unet.dtype, pipe.vae.dtype} == {torch.float32}
        pipe.set_progress_bar_config(disable=True)
        out = pipe(caption(7), num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")
        assert out.images.shape == (1, 1, 32, 32)
