"""``digits-video``: the video-question generator, the prompt layout contract, a 2-step recipe run and the
shipped model's accuracy."""

from __future__ import annotations

import json

import pytest
import torch

from mmskip import zoo
from mmskip.zoo import video_data as D

from ._resume import assert_resumes, record_draws


@pytest.fixture(scope="module")
def tok():
    return D.build_tokenizer()


@pytest.fixture(scope="module")
def tiny():
    from mmskip.zoo.video_model import make_model

    torch.manual_seed(0)
    return make_model("tiny").eval()


def test_answers_are_right_for_a_known_video():
    labels = torch.tensor([3, 7, 3, 1, 0, 7, 7, -1])  # -1: a frame slot that is not shown
    assert D.ask(labels, "digit", 1) == ("what digit is in frame2 ?", "7")
    assert D.ask(labels, "digit", 4) == ("what digit is in frame5 ?", "0")
    assert D.ask(labels, "count", 7) == ("how many frames show 7 ?", "3")
    assert D.ask(labels, "count", 5)[1] == "0" and D.ask(labels, "count", 3)[1] == "2"
    assert D.ask(labels, "first", 1) == ("which frame shows 1 first ?", "4")
    assert D.ask(labels, "first", 3)[1] == "1" and D.ask(labels, "first", 7)[1] == "2"
    assert D.ask(labels, "any", 0) == ("is 0 in frames ?", "1")
    assert D.ask(labels, "any", 5)[1] == "0" and D.ask(labels, "any", 7)[1] == "1"
    assert D.ask(labels[:4], "any", 0)[1] == "0"  # frame5's 0 is not in the first clip
    with pytest.raises(ValueError, match="not in the video"):
        D.ask(labels, "first", 5)
    with pytest.raises(ValueError):
        D.ask(labels, "colour", 0)


def test_videos_are_seeded_and_show_one_split_digit_per_frame():
    bank = D.digit_bank("test")
    a = D.make_videos(bank, 6, torch.Generator().manual_seed(3))
    b = D.make_videos(bank, 6, torch.Generator().manual_seed(3))
    assert torch.equal(a.frames, b.frames) and torch.equal(a.labels, b.labels)
    assert a.frames.shape == (6, D.MAX_CLIPS, D.FRAMES, 32, 32) and a.labels.shape == (6, D.MAX_CLIPS, D.FRAMES)
    assert set(a.n_clips.tolist()) <= {1, 2}
    big = torch.nn.functional.interpolate(bank[0][:, None], scale_factor=2, mode="bilinear")[:, 0].clamp(0, 1)
    for i in range(6):
        for c in range(D.MAX_CLIPS):
            for f in range(D.FRAMES):
                frame = a.frames[i, c, f]
                if c >= a.n_clips[i]:  # an unused clip slot: blank, no label
                    assert frame.abs().sum() == 0 and a.labels[i, c, f] == -1
                    continue
                r, col = a.positions[i, c, f].tolist()
                crop = frame[r:r + 16, col:col + 16]
                assert frame.sum() == pytest.approx(crop.sum())  # nothing outside the 16×16 digit
                hit = (big - crop).flatten(1).abs().amax(1) < 1e-6  # a held-out digit of the stated class
                assert hit.any() and (bank[1][hit] == a.labels[i, c, f]).all()
    clips = a.clips()
    assert [len(x) for x in clips] == a.n_clips.tolist()
    assert D.pixel_values_videos(a).shape == (int(a.n_clips.sum()), D.FRAMES, 3, 32, 32)


def test_prompt_layout_contract(tok):
    assert D.TOKENS_PER_FRAME == 16 and D.N_CLIP_TOKENS == D.FRAMES * 16 + 1 == 65
    video = tok.convert_tokens_to_ids(D.VIDEO_TOKEN)
    assert D.prefix_ids(tok) == [tok.bos_token_id] + tok.convert_tokens_to_ids(["USER", ":"])
    assert D.clip_ids(tok) == [video] * 65 and D.clip_ids(tok, 2) == [video] * 33
    q = "which frame shows 4 first ?"
    assert D.question_ids(tok, q) == tok.convert_tokens_to_ids(q.split() + ["ASSISTANT", ":"])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        D.question_ids(tok, "what colour is frame1 ?")
    for n in (1, 2):
        ids = tok(D.prompt_text(q, n))["input_ids"]
        assert ids == D.prefix_ids(tok) + D.clip_ids(tok) * n + D.question_ids(tok, q) == D.prompt_ids(tok, q, n)
        assert ids.count(video) == n * D.N_CLIP_TOKENS and tok.unk_token_id not in ids
    g = torch.Generator().manual_seed(0)
    videos = D.make_videos(D.digit_bank("test"), 24, g)
    qs, ans, qt = D.sample_questions(videos, g)
    batch = D.make_batch(tok, videos, qs, ans, qt)
    for i, q in enumerate(qs):
        ref = D.prompt_ids(tok, q, int(videos.n_clips[i])) + [tok.convert_tokens_to_ids(ans[i]), tok.eos_token_id]
        assert batch.input_ids[i, :len(ref)].tolist() == ref
        assert batch.labels[i][batch.labels[i] != -100].tolist() == ref[-2:]
        assert batch.input_ids[i, batch.answer_pos[i]] == tok.convert_tokens_to_ids(ans[i])
        assert ans[i] == D.ask(videos.labels[i].flatten(), qt[i], _asked(q))[1]
    assert set(qt) == set(D.QTYPES) and all(a in tok.get_vocab() for a in ans)


def _asked(question: str) -> int:
    w = question.split()
    return int(w[4][5:]) - 1 if w[0] == "what" else int({"which": w[3], "is": w[1]}.get(w[0], w[-2]))


def test_any_questions_are_balanced_and_right(tok):
    held = D.heldout_set(tok, n_per_type=200)
    asked = [(q, a, i) for i, (q, a, t) in enumerate(zip(held.questions, held.answers, held.qtypes)) if t == "any"]
    assert len(asked) == 200 and 0.35 < sum(a == "1" for _, a, _ in asked) / 200 < 0.65
    for q, a, i in asked:
        assert (D.ask(held.videos.labels[i].flatten(), "any", _asked(q)) == (q, a))


def test_packed_rows_compute_each_question_as_its_own_prompt(tok, tiny):
    """A packed row (several questions after one video, :mod:`recipes._video_pack`) gives each question's
    answer and ``</s>`` the logits of that question's own one-question prompt, and labels only those."""
    from recipes._video_pack import packed_batch, packed_questions

    g = torch.Generator().manual_seed(4)
    videos = D.make_videos(D.digit_bank("test"), 3, g)
    qa = packed_questions(videos, g, {"digit": 2, "count": 1, "first": 1, "any": 2})
    assert [len(x) for x in qa] == [6, 6, 6]
    ids, mask, position_ids, labels = packed_batch(tok, videos, qa)
    with torch.no_grad():
        packed = tiny(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                      pixel_values_videos=D.pixel_values_videos(videos)).logits
    for i in range(3):
        v = videos[i]
        same = D.Videos(v.frames.expand(6, *v.frames.shape[1:]), v.labels.expand(6, *v.labels.shape[1:]),
                        v.positions.expand(6, *v.positions.shape[1:]), v.n_clips.expand(6))
        one = D.make_batch(tok, same, [q for q, _ in qa[i]], [a for _, a in qa[i]], ["-"] * 6)
        with torch.no_grad():
            alone = tiny(input_ids=one.input_ids, attention_mask=one.attention_mask,
                         pixel_values_videos=one.pixel_values_videos).logits
        targets = torch.nonzero(labels[i] != -100).flatten()
        assert len(targets) == 12 and ids[i, targets].tolist() == [x for _, a in qa[i] for x in (
            tok.convert_tokens_to_ids(a), tok.eos_token_id)]
        for k in range(6):
            start = int(targets[2 * k]) - len(D.question_ids(tok, qa[i][k][0]))  # the block's first token
            n = int(one.answer_pos[k]) + 2 - start
            head = int(one.answer_pos[k]) + 2 - n
            torch.testing.assert_close(packed[i, start:start + n], alone[k, head:head + n], atol=1e-4, rtol=1e-4)


def test_video_features_fill_exactly_the_clip_placeholders(tok, tiny):
    """The model makes F*16 + 1 features a clip (pooled frames + image_newline): one per ``<video>`` token."""
    pv = torch.rand(3, D.FRAMES, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        feats = tiny.model.get_video_features(pv, return_dict=True).pooler_output
    assert feats.shape[:2] == (3, len(D.clip_ids(tok))) == (3, D.N_CLIP_TOKENS)
    assert tiny.config.video_token_id == tok.convert_tokens_to_ids(D.VIDEO_TOKEN)
    # a 2-clip and a 1-clip video in one left-padded batch: 3 videos in pixel_values_videos, in order
    g = torch.Generator().manual_seed(1)
    frames = torch.rand(2, D.MAX_CLIPS, D.FRAMES, 32, 32, generator=g)
    clips = [frames[0], frames[1, 0]]
    enc = D.encode(tok, clips, ["what digit is in frame6 ?", "how many frames show 2 ?"])
    assert enc["pixel_values_videos"].shape == (3, D.FRAMES, 3, 32, 32)
    assert torch.equal(enc["pixel_values_videos"][2, :, 0], frames[1, 0] * 2 - 1)
    assert enc["attention_mask"][1, 0] == 0 and enc["attention_mask"][0].all()  # left-padded
    assert enc["input_ids"][1, -1] == tok.convert_tokens_to_ids(":")
    with torch.no_grad():
        logits = tiny(**enc).logits
    assert logits.shape[:2] == enc["input_ids"].shape
    # the same 2-clip video alone gives the same answer logits (padding and batching change nothing)
    with torch.no_grad():
        alone = tiny(**D.encode(tok, frames[:1], ["what digit is in frame6 ?"])).logits
    torch.testing.assert_close(alone[0, -1], logits[0, -1], atol=1e-4, rtol=1e-4)
    answers = D.answer(tiny, tok, clips, ["what digit is in frame6 ?", "how many frames show 2 ?"])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_streaming_the_prompt_in_parts_gives_the_full_prompt_logits(tok, tiny):
    """``prefix_ids``, then each clip's ``clip_ids`` with that clip's frames, then ``question_ids``, through the
    cache: the same last logits as the whole prompt at once."""
    frames = torch.rand(1, D.MAX_CLIPS, D.FRAMES, 32, 32, generator=torch.Generator().manual_seed(2))
    q = "which frame shows 3 first ?"
    with torch.no_grad():
        full = tiny(**D.encode(tok, frames, [q])).logits[0, -1]
        out = tiny(input_ids=torch.tensor([D.prefix_ids(tok)]), use_cache=True)
        for c in range(D.MAX_CLIPS):
            out = tiny(input_ids=torch.tensor([D.clip_ids(tok)]), cache=out.cache, use_cache=True,
                       pixel_values_videos=D.pixel_values_videos([frames[0, c]]))
        out = tiny(input_ids=torch.tensor([D.question_ids(tok, q)]), cache=out.cache, use_cache=True)
    torch.testing.assert_close(out.logits[0, -1], full, atol=1e-4, rtol=1e-4)


def test_patch_labels_mark_the_patches_on_the_digit():
    from mmskip.cli import recipe

    BACKGROUND, patch_labels = recipe("video").BACKGROUND, recipe("video").patch_labels

    videos = D.make_videos(D.digit_bank("test"), 3, torch.Generator().manual_seed(5), clips=(1, 2))
    videos.positions[0, 0, 0] = torch.tensor([0, 16])  # top right corner
    cells = patch_labels(videos)
    assert cells.shape == (int(videos.n_clips.sum()) * D.FRAMES, 64)
    grid = cells[0].view(8, 8)
    assert (grid[:4, 4:] == videos.labels[0, 0, 0]).all() and (grid[4:] == BACKGROUND).all()
    assert (grid[:, :4] == BACKGROUND).all()
    assert ((cells != BACKGROUND).sum(1) == 16).all()  # a 16×16 digit covers 4×4 patch centres


def test_heldout_set_is_fixed(tok):
    a, b = D.heldout_set(tok, n_per_type=10), D.heldout_set(tok, n_per_type=10)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values_videos, b.pixel_values_videos)
    assert a.qtypes == [t for t in D.QTYPES for _ in range(10)]
    assert len(a[5:12]) == 7 and a[5:12].pixel_values_videos.shape[0] == int(a.videos.n_clips[5:12].sum())


def test_two_step_cpu_run_on_a_tiny_config_writes_a_loadable_folder(tmp_path):
    from mmskip.cli import recipe
    from mmskip.zoo.loaders import LOADERS

    train_video = recipe("video").train_video

    out = tmp_path / "digits-video"
    m = train_video(out, steps=2, batch=4, device="cpu", size="tiny", n_eval=5)
    files = sorted(p.name for p in out.iterdir())
    assert {"README.md", "metrics.json", "config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert len(files) <= 8 and sum(p.stat().st_size for p in out.iterdir()) < 1_000_000
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["steps"] == 2 == m["steps"] and 0 <= metrics["held-out accuracy, first (5)"] <= 1
    assert "Training loss" in (out / "README.md").read_text()
    model, tok = LOADERS["digits-video"](out)
    assert type(model).__name__ == "LlavaOnevisionForConditionalGeneration"
    assert not model.training and next(model.parameters()).dtype == torch.float32
    videos = D.make_videos(D.digit_bank("test"), 2, torch.Generator().manual_seed(0))
    answers = D.answer(model, tok, videos, ["what digit is in frame1 ?", "how many frames show 3 ?"])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_a_checkpointed_run_resumes_and_an_init_run_starts_from_a_saved_folder(tmp_path, monkeypatch):
    from mmskip.cli import recipe
    from mmskip.zoo.loaders import LOADERS

    video = recipe("video")
    drawn = record_draws(video, monkeypatch)
    out = tmp_path / "run"
    assert_resumes(video.train_video, drawn, out)
    # init: no vision warm-up, the whole model starts from the folder's weights
    start, _ = LOADERS["digits-video"](out)
    m = video.train_video(tmp_path / "init", steps=1, batch=2, size="tiny", n_eval=4, init=out, init_note="run A",
                          lr=1e-12)
    assert drawn == [("whole", 0)] and m["vision warm-up steps"] == 0
    after, _ = LOADERS["digits-video"](tmp_path / "init")
    for (name, a), b in zip(start.state_dict().items(), after.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3, msg=name)
    card = (tmp_path / "init" / "README.md").read_text()
    assert "initialised from run A" in card and "init=FOLDER" in card and "Vision warm-up loss" not in card


def test_base_config_is_a_small_onevision_with_clip_and_llama():
    from mmskip.zoo.video_model import make_model

    model = make_model("base")
    cfg = model.config
    assert cfg.vision_config.model_type == "clip_vision_model" and cfg.text_config.model_type == "llama"
    assert cfg.vision_config.image_size // cfg.vision_config.patch_size == 8  # 64 patches, pooled to 16
    assert 4 <= cfg.text_config.num_hidden_layers and cfg._attn_implementation == "sdpa"
    assert len(D.build_tokenizer()) <= cfg.text_config.vocab_size
    assert sum(p.numel() for p in model.parameters()) * 2 < 6_000_000  # fp16 folder <= 6 MB


@pytest.mark.skipif("digits-video" not in zoo.available(), reason="zoo model digits-video not trained")
def test_shipped_model_answers_heldout_questions_above_chance_as_its_card_says():
    from mmskip.cli import recipe

    evaluate, majority_baseline = recipe("video").evaluate, recipe("video").majority_baseline

    folder = zoo.path("digits-video")
    card = json.loads((folder / "metrics.json").read_text())["metrics"]
    model, tok = zoo.load("digits-video")
    assert sum(p.stat().st_size for p in folder.iterdir()) < 6_500_000
    held = D.heldout_set(tok, n_per_type=60)  # 60 questions of each type on held-out-digit videos
    acc, chance = evaluate(model, held), majority_baseline(held)
    assert acc["digit"] > chance["digit"] + 0.15, (acc, chance)  # reads single frames well above chance
    for t in ("count", "any"):  # and aggregates over frames well above chance
        assert acc[t] > chance[t] + 0.15, (t, acc, chance)
    for t in D.QTYPES:
        claimed = card[next(k for k in card if k.startswith(f"held-out accuracy, {t} "))]
        assert acc[t] >= claimed - 0.12, (t, acc[t], claimed)
    # greedy generation (left-padded, mixed 1- and 2-clip videos) gives the teacher-forced answers
    idx = [0, 1, 2, 61, 62, 121, 122]
    videos = [held.videos[i].clips()[0] for i in idx]
    assert {len(v) for v in videos} == {1, 2}
    got = D.answer(model, tok, videos, [held.questions[i] for i in idx])
    with torch.no_grad():
        want = [tok.convert_ids_to_tokens(int(model(input_ids=held.input_ids[i:i + 1],
                                                    pixel_values_videos=held[i:i + 1].pixel_values_videos).logits[
                                                        0, held.answer_pos[i] - 1].argmax())) for i in idx]
    assert got == want


def test_tally_targets_count_and_find_each_digit_frame_by_frame():
    from recipes._video_tally import frame_ends, tally_targets

    labels = torch.tensor([[[3, 7, 3, 1], [0, 7, 7, 2]], [[5, 5, 5, 5], [1, 1, 1, 1]]])
    videos = D.Videos(torch.zeros(2, 2, D.FRAMES, 32, 32), labels, torch.zeros(2, 2, D.FRAMES, 2, dtype=torch.long),
                      torch.tensor([2, 2]))
    t = tally_targets(videos)
    assert t.shape == (2, 8, 2, 10)
    assert t[0, :, 0, 7].tolist() == [0, 1, 1, 1, 1, 2, 3, 3]  # frames showing 7 so far
    assert t[0, :, 1, 7].tolist() == [0, 2, 2, 2, 2, 2, 2, 2]  # 7 first seen in frame 2
    assert t[0, :, 1, 0].tolist() == [0] * 4 + [5] * 4 and t[1, -1, 0, 5] == 4 and t[1, -1, 1, 1] == 5
    assert t[0, -1, 0].sum() == 8 and (t[1, :, 0, 9] == 0).all()
    ends = frame_ends(2, 3)
    assert ends.tolist() == [18, 34, 50, 66, 83, 99, 115, 131]  # after <s> USER :, 16 a frame, a newline a clip
    with pytest.raises(ValueError, match="same number of clips"):
        tally_targets(D.Videos(videos.frames, labels, videos.positions, torch.tensor([1, 2])))


def test_attention_targets_mark_the_digit_tokens_of_the_named_frames_at_their_prompt_positions(tok):
    from mmskip.cli import recipe
    from recipes._video_pack import packed_batch, packed_questions

    video = recipe("video")
    g = torch.Generator().manual_seed(6)
    videos = D.make_videos(D.digit_bank("test"), 2, g, clips=(2, 2))
    videos.positions[0, 1, 2] = torch.tensor([0, 16])  # frame 7 of video 0: the digit in the top right corner
    qa = packed_questions(videos, g, {"digit": 1, "count": 1})
    qa[0][0] = ("what digit is in frame7 ?", str(int(videos.labels[0, 1, 2])))
    ids, _, _, labels = packed_batch(tok, videos, qa)
    targets = video.attention_targets(videos, qa)
    assert targets.shape == (2, 2, 8 * 16)
    frame7 = targets[0, 0].view(8, 4, 4)
    assert not frame7[[0, 1, 2, 3, 4, 5, 7]].any() and frame7[6].tolist() == [[False, False, True, True]] * 2 + \
        [[False] * 4] * 2  # the pooled 2×2 tokens under a 16×16 digit in the top right corner
    assert targets[:, 1].view(2, 8, 16).any(2).all()  # a count question reads every frame's digit
    positions = video.vision_positions(2, len(D.prefix_ids(tok)))
    assert (ids[:, positions] == tok.convert_tokens_to_ids(D.VIDEO_TOKEN)).all()
    assert len(positions) == 2 * D.N_CLIP_TOKENS - 2  # every <video> token but the clips' newlines
    # the loss is 0 only for attention spread evenly over the targets, from each answer-predicting position
    n, L = ids.shape
    attn = torch.full((n, 2, L, L), 1e-9)
    answers = torch.nonzero(labels != -100)[:, 1].view(2, 4)[:, 0::2]
    for i in range(n):
        for k in range(2):
            attn[i, :, answers[i, k] - 1, positions] = targets[i, k].float()
    attn = attn / attn.sum(-1, keepdim=True)
    assert video.attention_loss(attn, labels, positions, targets) < 1e-4
    moved = attn.roll(1, dims=-1)  # one token over
    assert video.attention_loss(moved, labels, positions, targets) > 5


def test_a_first_frame_question_attends_to_the_frame_its_answer_names():
    from mmskip.cli import recipe

    video = recipe("video")
    labels = torch.tensor([3, 5, 3, 5, 7, 5, 1, 2])
    q, a = D.ask(labels, "first", 5)
    assert video.attended_frames(q, a, 8).tolist() == [False, True] + [False] * 6  # frame 2, not every frame
    q, a = D.ask(labels, "count", 5)
    assert video.attended_frames(q, a, 8).all()  # a count reads every frame
    q, a = D.ask(labels, "digit", 6)
    assert video.attended_frames(q, a, 8).tolist() == [False] * 6 + [True, False]
