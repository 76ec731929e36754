"""mmskip.tune on the vision wing's targets: tiny LLaVA (p-MoD) and tiny Florence-2 (MuE)."""

from __future__ import annotations

import itertools

import pytest
import torch
from mmskip.vision import Florence2Target, MoDConfig, MuEConfig, VideoMoDConfig, VLMTarget

import mmskip
from mmskip.inject import SkipConfig
from mmskip.tuning import Choice, FloatRange, IntRange, TuneContext, make_target

from ._tiny import (
    onevision_video_prompts,
    padded_prompts,
    qwen_clip,
    qwen_video_prompt,
    tiny_llava,
    tiny_onevision,
    tiny_qwen2vl,
)
from ._tiny_florence import florence_prompts, row, tiny_florence

pytest.importorskip("optuna")


def _llava_questions(n: int = 4) -> list[dict[str, torch.Tensor]]:
    b = padded_prompts(tuple(range(1, n + 1)))
    return [{"input_ids": b["input_ids"][i][b["attention_mask"][i].bool()], "pixel_values": b["pixel_values"][i:i + 1]}
            for i in range(n)]


def _florence_questions(n: int = 4) -> list[dict[str, torch.Tensor]]:
    b = florence_prompts(tuple(range(1, n + 1)))
    out = []
    for i in range(n):
        r = row(b, i)
        out.append({"input_ids": r["input_ids"][0], "attention_mask": r["attention_mask"][0],
                    "pixel_values": r["pixel_values"]})
    return out


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _check_tune(model, target_cls, questions, floor, **options) -> None:
    target = target_cls(model, **options)
    before_state, before_out = _state(model), target.run(target.check_inputs(questions, "q"))
    result = mmskip.tune(model, questions[:2], held_out=questions[2:], floor=floor, budget=3, repeats=3,
                         finalists=2, progress=False, **options)
    best = next(m for m in result.measured if m.candidate.key == result.best.key)
    assert best.quality["answer_agreement"] >= floor  # the returned config meets the floor on held-out
    assert result.measured[0].candidate.family == "baseline" and result.trials == 3
    assert all(c.technique in ("pmod", "videomod", "mue") for c in result.best.configs)
    after = model.state_dict()  # restored exactly: weights and answers
    assert after.keys() == before_state.keys() and all(torch.equal(after[k], v) for k, v in before_state.items())
    assert target.run(target.check_inputs(questions, "q")) == before_out


def test_tune_llava_meets_floor_and_restores():
    model = tiny_llava()
    assert isinstance(make_target(model), VLMTarget)
    _check_tune(model, VLMTarget, _llava_questions(), 0.5, max_new_tokens=2)


def test_tune_florence_meets_floor_and_restores():
    model = tiny_florence(encoder_layers=2, decoder_layers=3)
    assert isinstance(make_target(model), Florence2Target)
    _check_tune(model, Florence2Target, _florence_questions(), 0.5, max_new_tokens=3)


def test_registry_takes_qwen2vl_and_onevision():
    assert isinstance(make_target(tiny_qwen2vl()), VLMTarget)
    assert isinstance(make_target(tiny_onevision()), VLMTarget)


def test_qwen2vl_video_questions_batch_and_run():
    model = tiny_qwen2vl()
    t = make_target(model, max_new_tokens=2, batch_size=2)
    rows = [qwen_video_prompt([qwen_clip(seed=4)]), qwen_video_prompt([qwen_clip(seed=5)], pre=(5,))]
    items = [{k: v[0] if k in ("input_ids", "mm_token_type_ids") else v for k, v in r.items()} for r in rows]
    questions = t.check_inputs(items, "inputs")
    assert [s.technique for s in t.spaces()] == ["pmod", "videomod"]  # video inputs: VideoMoD is searched too
    out = t.run(questions)
    assert [len(o["tokens"]) for o in out] == [2, 2] and t.quality(out, out) == {"answer_agreement": 1.0}


def _corners(space) -> list[dict]:
    axes = []
    for p in space.params.values():
        if isinstance(p, Choice):
            axes.append(list(p.values))
        elif isinstance(p, (IntRange, FloatRange)):
            axes.append([p.low, p.high])
    return [dict(zip(space.params, v)) for v in itertools.product(*axes)]


@pytest.mark.parametrize("cls,make,video", [(MoDConfig, tiny_llava, False), (VideoMoDConfig, tiny_onevision, True)])
def test_mod_space_corners_build_and_apply(cls, make, video):
    model = make()
    batch = onevision_video_prompts() if video else padded_prompts()
    ctx = TuneContext(model, "vlm", num_layers=4, facts={"video": video, "routers": None})
    space = cls.search_space(ctx)
    assert space.technique == cls.technique and "router" not in space.params["signal"].values
    for values in _corners(space) + list(space.seeds):
        config = space.build(values)
        assert isinstance(config, cls) and SkipConfig.from_dict(config.to_dict()) == config  # saves and loads
        with mmskip.applied(model, config), torch.no_grad():  # fits the model's depth and runs
            assert torch.isfinite(model(**batch).logits).all()
    with_routers = cls.search_space(TuneContext(model, "vlm", num_layers=4, facts={"video": video, "routers": "r/"}))
    assert "router" in with_routers.params["signal"].values
    assert with_routers.build({**_corners(space)[0], "signal": "router"}).routers == "r/"
    with pytest.raises(ValueError, match="do not fit"):
        space.build({**_corners(space)[0], "first": 4})
    assert cls.search_space(TuneContext(model, "lm", num_layers=4)) is None
    assert VideoMoDConfig.search_space(TuneContext(model, "vlm", num_layers=4, facts={"video": False})) is None


def test_mue_space_corners_build_and_apply():
    model = tiny_florence(encoder_layers=2, decoder_layers=3)
    batch = florence_prompts()
    space = MuEConfig.search_space(TuneContext(model, "encoder_decoder", num_layers=3, facts={"decoder_layers": 3}))
    corners = _corners(space)
    for values in corners + list(space.seeds):
        config = space.build(values)
        assert isinstance(config, MuEConfig) and config.floor <= config.decoder_threshold
        assert SkipConfig.from_dict(config.to_dict()) == config
        with mmskip.applied(model, config):
            assert model.generate(**batch, max_new_tokens=2).shape[0] == 3
    assert space.build({**corners[0], "encoder": 1.0}).image_threshold is None  # 1.0: no encoder exits
    with pytest.raises(ValueError, match="min_layers"):
        space.build({**corners[0], "min_layers": 3})
    assert MuEConfig.search_space(TuneContext(model, "vlm", num_layers=3)) is None


def test_quality_agreement_and_accuracy():
    t = VLMTarget(tiny_llava())
    ref = [{"tokens": (5,), "text": "5", "answer": "5"}, {"tokens": (6,), "text": "6", "answer": "7"}]
    out = [{"tokens": (5,), "text": "5", "answer": "5"}, {"tokens": (7,), "text": "7", "answer": "7"}]
    assert t.quality(ref, ref) == {"answer_agreement": 1.0, "accuracy": 0.5, "accuracy_delta": 0.0}
    assert t.quality(out, ref) == {"answer_agreement": 0.5, "accuracy": 1.0, "accuracy_delta": 0.5}
    no_answers = [{**r, "answer": None} for r in ref]
    assert t.quality(no_answers, no_answers) == {"answer_agreement": 1.0}


def test_bad_inputs():
    t = VLMTarget(tiny_llava())
    q = _llava_questions(2)
    with pytest.raises(ValueError, match="empty"):
        t.check_inputs([], "inputs")
    with pytest.raises(TypeError, match="list of dicts"):
        t.check_inputs("what digit?", "inputs")
    with pytest.raises(TypeError, match="input_ids"):
        t.check_inputs([{"pixel_values": q[0]["pixel_values"]}], "inputs")
    with pytest.raises(TypeError, match="one non-empty row"):
        t.check_inputs([{**q[0], "input_ids": torch.zeros(2, 3, dtype=torch.long)}], "inputs")
    with pytest.raises(ValueError, match="same kind of arguments"):
        VLMTarget(tiny_llava()).check_inputs([q[0], {"input_ids": q[1]["input_ids"]}], "inputs")
    with pytest.raises(ValueError, match="tokenizer="):
        t.check_inputs([{**q[0], "answer": "3"}], "inputs")
    with pytest.raises(ValueError, match="give inputs"):
        t.default_inputs(4)
    with pytest.raises(ValueError, match="empty"):
        mmskip.tune(tiny_llava(), [], budget=1, progress=False)
