"""``digits-florence``: the strip/task generator, a 2-step recipe run, and the shipped model's exact match."""

from __future__ import annotations

import json

import pytest
import torch

from mmskip import zoo
from mmskip.zoo import florence_data as D


@pytest.fixture(scope="module")
def tok():
    return D.build_tokenizer()


def test_targets_for_a_known_strip():
    three, two = torch.tensor([7, 3, 5]), torch.tensor([7, D.BLANK, 3])
    assert D.target(three, "caption") == "a 7 next to a 3 and a 5"
    assert D.target(two, "caption") == "a 7 next to a 3"
    assert D.target(three, "sum") == "15" and D.target(two, "sum") == "10"
    assert D.target(torch.tensor([7, 7, 1]), "count", 7) == "2" and D.target(two, "count", 4) == "0"
    assert D.target(two, "position", 1) == "nothing" and D.target(two, "position", 2) == "3"
    assert D.prompt("position", 0) == "what is on the left ?"
    with pytest.raises(ValueError):
        D.prompt("colour")


def test_strips_are_seeded_from_the_right_split_with_blank_slots():
    bank = D.digit_bank("test")
    a = D.make_strips(bank, 40, torch.Generator().manual_seed(3))
    b = D.make_strips(bank, 40, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    images, slots = a
    assert images.shape == (40, 8, 24) and slots.shape == (40, 3)
    blanks = (slots == D.BLANK).sum(1)
    assert set(blanks.tolist()) == {0, 1}
    for s in range(3):
        cell = images[0, :, 8 * s:8 * s + 8]
        if int(slots[0, s]) == D.BLANK:
            assert cell.abs().sum() == 0
        else:
            hit = (bank[0] - cell).flatten(1).abs().sum(1) == 0
            assert hit.any() and (bank[1][hit] == slots[0, s]).all()
    assert D.slot_labels(torch.tensor([[1, 2, 3]])).tolist() == [[1, 1, 2, 2, 3, 3] * 2]
    assert D.pixel_values(images).shape == (40, 3, 8, 24)


def test_encoder_layout_and_labels(tok):
    g = torch.Generator().manual_seed(0)
    images, slots = D.make_strips(D.digit_bank("test"), 16, g)
    batch = D.make_batch(tok, images, *D.sample_tasks(slots, g), slots)
    image = tok.convert_tokens_to_ids(D.IMAGE_TOKEN)
    for i, p in enumerate(batch.prompts):
        ids = batch.input_ids[i][batch.attention_mask[i] == 1].tolist()
        assert ids == [image] * D.N_IMAGE_TOKENS + tok(p)["input_ids"]  # the tokenizer adds <s> ... </s>
        assert tok.unk_token_id not in ids
        lab = batch.labels[i][batch.labels[i] != -100].tolist()
        assert lab == tok(batch.targets[i], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert set(batch.tasks) <= set(D.TASKS)


def test_recipe_runs_two_steps_and_loads_back(tmp_path):
    from mmskip.cli import recipe
    from mmskip.zoo import loaders

    train_florence = recipe("florence").train_florence

    out = tmp_path / "digits-florence"
    metrics = train_florence(out, steps=2, batch=8, size="tiny", n_eval=2, progress=False)
    assert metrics["steps"] == 2 and metrics["parameters"] > 0
    card = (out / "README.md").read_text()
    assert "digits-florence" in card and "--steps 2 --batch 8" in card and "BLEU" in card
    assert json.loads((out / "metrics.json").read_text())["metrics"]["steps"] == 2
    assert (out / "model.safetensors").is_file() and not (out / "checkpoint").exists()
    model, tok = loaders.load_florence(out)
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    g = torch.Generator().manual_seed(0)
    images, _ = D.make_strips(D.digit_bank("test"), 2, g)
    answers = D.generate(model, tok, images, ["what is the sum ?", "describe the image"], max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


@pytest.mark.skipif("digits-florence" not in zoo.available(), reason="zoo model digits-florence not trained")
def test_shipped_model_beats_the_majority_baseline(tok):
    model, tok = zoo.load("digits-florence")
    held = D.heldout_set(tok, n_per_task=15, seed=99)
    acc = D.score(D.answers(model, tok, held), held)
    chance = D.majority_baseline(held)
    assert acc["all"] > sum(chance.values()) / len(chance) + 0.2, (acc, chance)
    for t in ("caption", "position"):
        assert acc[t] > chance[t], (t, acc, chance)
    assert acc["bleu"] is not None and acc["bleu"] > 0.5
    assert sum(p.numel() for p in model.parameters()) < 2.5e6
