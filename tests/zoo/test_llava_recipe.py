"""``digits-llava``: the grid-question generator, a 5-step recipe run, and the shipped model's accuracy."""

from __future__ import annotations

import json

import pytest
import torch

from mmskip import zoo
from mmskip.zoo import llava_data as D

from ._resume import assert_resumes, record_draws


@pytest.fixture(scope="module")
def tok():
    return D.build_tokenizer()


def test_answers_are_right_for_a_known_grid():
    labels = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 7, 7], [1, 1, 1, 0]])
    assert D.ask(labels, "digit", 1, 2) == ("what digit is in row2 column3 ?", "6")
    assert D.ask(labels, "digit", 3, 3) == ("what digit is in row4 column4 ?", "0")
    assert D.ask(labels, "count", 7) == ("how many 7 are there ?", "3")
    assert D.ask(labels, "count", 1)[1] == "4" and D.ask(labels, "count", 2)[1] == "1"
    assert D.ask(labels, "sum", 2, 0) == ("what is the sum of row3 ?", "31")
    assert D.ask(labels, "sum", 0, 1) == ("what is the sum of column1 ?", "13")
    with pytest.raises(ValueError):
        D.ask(labels, "colour", 0)


def test_grids_are_seeded_rendered_in_place_and_from_the_right_split():
    bank = D.digit_bank("test")
    assert bank[0].shape == (300, 8, 8) and 0 <= bank[0].min() and bank[0].max() <= 1
    a = D.make_grids(bank, 6, torch.Generator().manual_seed(3))
    b = D.make_grids(bank, 6, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    images, labels = a
    assert images.shape == (6, 32, 32) and labels.shape == (6, 4, 4)
    # every cell is a held-out digit image of the stated class, at its row/column
    for r in range(4):
        for c in range(4):
            cell = images[0, 8 * r:8 * r + 8, 8 * c:8 * c + 8]
            hit = (bank[0] - cell).flatten(1).abs().sum(1) == 0
            assert hit.any() and (bank[1][hit] == labels[0, r, c]).all()
    assert D.pixel_values(images).shape == (6, 3, 32, 32)


def test_prompts_have_one_image_token_per_patch_and_single_token_answers(tok):
    ids = tok(D.prompt_text("what digit is in row1 column2 ?"))["input_ids"]
    image_id = tok.convert_tokens_to_ids(D.IMAGE_TOKEN)
    assert ids[0] == tok.bos_token_id and ids.count(image_id) == D.N_IMAGE_TOKENS == 64
    assert tok.unk_token_id not in ids
    g = torch.Generator().manual_seed(0)
    images, labels = D.make_grids(D.digit_bank("test"), 32, g)
    qs, ans, qt = D.sample_questions(labels, g)
    batch = D.make_batch(tok, images, qs, ans, qt)
    for i, q in enumerate(qs):  # the fast id path equals the tokenizer's
        ref = tok(D.prompt_text(q))["input_ids"] + [tok.convert_tokens_to_ids(ans[i]), tok.eos_token_id]
        assert batch.input_ids[i, :len(ref)].tolist() == ref
        assert batch.labels[i][batch.labels[i] != -100].tolist() == ref[-2:]
        assert batch.input_ids[i, batch.answer_pos[i]] == tok.convert_tokens_to_ids(ans[i])
    assert set(qt) == set(D.QTYPES)


def test_heldout_set_is_fixed(tok):
    a, b = D.heldout_set(tok, n_per_type=10), D.heldout_set(tok, n_per_type=10)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)
    assert a.qtypes == [t for t in D.QTYPES for _ in range(10)]


def test_five_step_cpu_run_on_a_tiny_config_writes_a_loadable_folder(tmp_path):
    from mmskip.cli import recipe
    from mmskip.zoo.loaders import LOADERS

    train_llava = recipe("llava").train_llava

    out = tmp_path / "digits-llava"
    m = train_llava(out, steps=5, batch=4, device="cpu", size="tiny", n_eval=10)
    files = sorted(p.name for p in out.iterdir())
    assert {"README.md", "metrics.json", "config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert len(files) <= 8 and sum(p.stat().st_size for p in out.iterdir()) < 1_000_000
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["steps"] == 5 == m["steps"] and 0 <= metrics["held-out accuracy, digit (10)"] <= 1
    assert "Training loss" in (out / "README.md").read_text()
    model, tok = LOADERS["digits-llava"](out)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    images, _ = D.make_grids(D.digit_bank("test"), 2, torch.Generator().manual_seed(0))
    answers = D.answer(model, tok, images, ["what digit is in row1 column1 ?", "how many 3 are there ?"])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_a_checkpointed_run_resumes_where_its_checkpoints_stop(tmp_path, monkeypatch):
    from mmskip.cli import recipe

    llava = recipe("llava")
    assert_resumes(llava.train_llava, record_draws(llava, monkeypatch), tmp_path / "run")


def test_probe_loss_is_low_only_for_features_that_carry_each_cell_digit():
    from mmskip.cli import recipe

    llava = recipe("llava")
    grid = torch.randint(0, 10, (3, 4, 4), generator=torch.Generator().manual_seed(0))
    cells = llava._patch_labels(grid)
    assert cells.shape == (3, 64) and cells[0, 0] == cells[0, 9] == grid[0, 0, 0] and cells[0, 6] == grid[0, 0, 3]
    probe = torch.nn.Linear(18, llava.PROBE_OUT, bias=False)  # features: one-hot digit, row, column
    with torch.no_grad():
        probe.weight.copy_(20 * torch.eye(18))
    where = llava._patch_labels(torch.arange(16).reshape(1, 4, 4)).expand(3, -1)
    pos = torch.cat([torch.nn.functional.one_hot(where // 4, 4), torch.nn.functional.one_hot(where % 4, 4)], -1)
    right = torch.cat([torch.nn.functional.one_hot(cells, 10), pos], -1).float()
    wrong_digit = torch.cat([torch.nn.functional.one_hot((cells + 1) % 10, 10), pos], -1).float()
    wrong_place = torch.cat([torch.nn.functional.one_hot(cells, 10), pos.flip(1)], -1).float()
    assert llava.probe_loss(probe, right, cells) < 1e-3
    assert llava.probe_loss(probe, wrong_digit, cells) > 20 and llava.probe_loss(probe, wrong_place, cells) > 10


def test_base_config_has_enough_decoder_layers_for_mod_and_stays_small():
    from mmskip.zoo.llava_model import make_model

    model = make_model("base")
    assert model.config.text_config.num_hidden_layers >= 8  # p-MoD needs MoD layers
    assert model.config.image_seq_length == D.N_IMAGE_TOKENS
    assert len(D.build_tokenizer()) <= model.config.text_config.vocab_size
    assert sum(p.numel() for p in model.parameters()) * 2 < 8_000_000  # fp16 folder < 8 MB


def test_cli_passes_device_and_batch_only_to_recipes_that_take_them(monkeypatch):
    import sys
    import types

    from mmskip.cli import recipe

    train = recipe("zoo")

    a = train.parse_args(["digits-llava", "--device", "cuda", "--batch", "64", "--steps", "7"])
    assert (a.device, a.batch, a.steps) == ("cuda", 64, 7)
    seen = {}
    fake = types.ModuleType("fake_llava")
    fake.recipe = lambda out, steps=1, batch=1, device=None: seen.update(out=out, steps=steps, batch=batch,
                                                                          device=device) or {}
    monkeypatch.setitem(sys.modules, "fake_llava", fake)
    monkeypatch.setitem(train.RECIPES, "digits-llava", ("fake_llava", "recipe"))
    train.train("digits-llava", steps=3, device="cuda", batch=8)
    assert seen["steps"] == 3 and seen["device"] == "cuda" and seen["batch"] == 8
    fake.other = lambda out, steps=1: {}
    monkeypatch.setitem(train.RECIPES, "digits-vae", ("fake_llava", "other"))
    with pytest.raises(ValueError, match="does not take --device"):
        train.train("digits-vae", steps=3, device="cuda")


@pytest.mark.skipif("digits-llava" not in zoo.available(), reason="zoo model digits-llava not trained")
def test_shipped_model_answers_heldout_questions_as_its_card_says():
    from mmskip.cli import recipe

    evaluate = recipe("llava").evaluate

    folder = zoo.path("digits-llava")
    card = json.loads((folder / "metrics.json").read_text())["metrics"]
    model, tok = zoo.load("digits-llava")
    assert sum(p.stat().st_size for p in folder.iterdir()) < 8_000_000
    held = D.heldout_set(tok, n_per_type=50)  # 50 questions of each type on held-out-digit grids
    acc = evaluate(model, held)
    for t in D.QTYPES:
        claimed = card[next(k for k in card if k.startswith(f"held-out accuracy, {t} "))]
        assert acc[t] >= claimed - 0.12, (t, acc[t], claimed)
    # greedy generation gives the teacher-forced answers
    idx = [0, 60, 120]
    images = (held.pixel_values[idx, 0] + 1) / 2
    got = D.answer(model, tok, images, [held.questions[i] for i in idx])
    logits_pred = [tok.convert_ids_to_tokens(int(model(input_ids=held.input_ids[i:i + 1],
                                                       pixel_values=held.pixel_values[i:i + 1]).logits[
                                                           0, held.answer_pos[i] - 1].argmax())) for i in idx]
    assert got == logits_pred


def test_question_cells_name_the_cells_each_answer_reads():
    cells = D.question_cells("what digit is in row2 column3 ?")
    assert cells.sum() == 1 and cells[1, 2]
    assert D.question_cells("what is the sum of row4 ?")[3].all() and D.question_cells("what is the sum of row4 ?").sum() == 4
    assert D.question_cells("what is the sum of column1 ?")[:, 0].all() and D.question_cells("what is the sum of column1 ?").sum() == 4
    assert D.question_cells("how many 7 are there ?").all()
    grid = torch.arange(16).reshape(4, 4)
    for t in D.QTYPES:  # every sampled question names cells its answer is computed from
        (q,), (a,), _ = D.sample_questions(grid[None] % 10, torch.Generator().manual_seed(3), [t])
        assert D.question_cells(q).any()


def test_attention_loss_is_zero_only_for_an_even_spread_over_the_named_cells():
    from mmskip.cli import recipe

    llava = recipe("llava")
    qs = ["what digit is in row1 column2 ?", "what is the sum of column4 ?", "how many 3 are there ?"]
    targets = llava.attention_targets(qs)
    assert targets.shape == (3, 64) and targets.sum(1).tolist() == [4, 16, 64]
    L, start, answer_pos = 80, 3, torch.tensor([75, 75, 75])
    image = torch.zeros(3, L, dtype=torch.bool)
    image[:, start:start + 64] = True

    def attn_on(weights: torch.Tensor) -> torch.Tensor:  # (3, 64) image weights -> (3, 2 heads, L, L), rows sum to 1
        a = torch.full((3, 2, L, L), 1e-9)
        a[:, :, 74, start:start + 64] = weights[:, None].float()
        return a / a.sum(-1, keepdim=True)

    right = llava.attention_loss(attn_on(targets), answer_pos, image, targets)
    first_only = torch.zeros(3, 64)
    first_only[torch.arange(3), targets.float().argmax(1)] = 1  # all of it on one named patch
    uneven = llava.attention_loss(attn_on(first_only), answer_pos, image, targets)
    assert abs(right) < 1e-4 < uneven
    # the digit and the sum question read one cell to the right of the named ones
    off = llava.attention_loss(attn_on(targets.roll(2, dims=1))[:2], answer_pos[:2], image[:2], targets[:2])
    assert off > 10 > uneven


def test_an_attention_loss_stage_runs_the_eager_kernel_and_gives_the_model_back_as_it_was():
    import types

    from mmskip.cli import recipe
    from mmskip.zoo.llava_model import make_model

    llava = recipe("llava")
    model = make_model("tiny")
    before = model.config._attn_implementation
    probe = torch.nn.Linear(model.config.text_config.hidden_size, llava.PROBE_OUT)
    stage = llava._LlavaTask(model, probe, lambda step: [], 0.5, 2, False, "t", attn=1.0, image_token=4)
    assert stage.fingerprint()["attn"] == 1.0
    stage.prepare(types.SimpleNamespace(device=torch.device("cpu")))
    assert model.config._attn_implementation == "eager"  # only it returns attention weights
    stage.finish()
    assert model.config._attn_implementation == before != "eager"
    plain = llava._LlavaTask(model, probe, lambda step: [], 0.5, 2, False, "t")
    plain.prepare(types.SimpleNamespace(device=torch.device("cpu")))
    assert model.config._attn_implementation == before and "attn" not in plain.fingerprint()
    plain.finish()
