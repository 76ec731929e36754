"""mmskip.tune on a causal LM: the search, the held-out confirmation, the log, the result, bad input."""

import json

import pytest
import torch

import mmskip
from mmskip.tuning import TuneError, TuneResult, UnsupportedTargetError, parse_budget
from mmskip.tuning.trial_log import LOG_NAME

from ..conftest import tiny_lm

G = torch.Generator().manual_seed(0)
PROMPTS = [torch.randint(3, 128, (12,), generator=G) for _ in range(6)]
FAST = dict(max_new_tokens=4, repeats=3, finalists=2, progress=False)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _generate(model):
    from mmskip.eval.language import greedy_generate

    return greedy_generate(model, PROMPTS[:2], 4)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    model = tiny_lm("llama", layers=6)
    before, out_before = _state(model), _generate(model)
    folder = tmp_path_factory.mktemp("tune")
    result = mmskip.tune(model, PROMPTS[:3], held_out=PROMPTS[3:], floor=0.0, budget=5, out=folder, **FAST)
    return model, before, out_before, folder, result


def test_result_meets_the_floor_on_held_out_and_lists_the_baseline(tuned):
    _, _, _, _, r = tuned
    assert r.measured[0].candidate.family == "baseline" and r.measured[0].quality["agreement"] == 1.0
    assert len(r.measured) >= 2 and r.trials == 5
    best = r.best_measured
    assert best.quality[r.metric] >= r.floor
    # the rule, whatever the timings: the fastest candidate faster in most paired rounds (lower
    # quartile above 1), else the baseline
    faster = [m for m in r.measured[1:] if m.spread[0] > 1.0 and m.quality[r.metric] >= r.floor]
    if faster:
        assert best.speedup == max(m.speedup for m in faster)
    else:
        assert best.candidate.family == "baseline"
    assert all(m.spread[0] <= m.speedup <= m.spread[1] for m in r.measured[1:])
    assert r.front and all(m in r.measured for m in r.front)


def test_tuning_leaves_the_model_exactly_as_it_was(tuned):
    model, before, out_before, _, _ = tuned
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(a, b) for a, b in zip(out_before, _generate(model)))
    assert not any(hasattr(m, "_diffusers_hook") and m._diffusers_hook._hooks for m in model.modules())


def test_trial_log_continues_a_search_without_measuring_again(tuned):
    model, _, _, folder, r = tuned
    lines = (folder / LOG_NAME).read_text().splitlines()
    assert json.loads(lines[0])["header"]["metric"] == "agreement" and len(lines) == 1 + 5
    again = mmskip.tune(model, PROMPTS[:3], held_out=PROMPTS[3:], floor=0.0, budget=5, out=folder, **FAST)
    assert len((folder / LOG_NAME).read_text().splitlines()) == len(lines)  # nothing new to try
    assert again.trials == 5


def test_same_seed_proposes_the_same_trials(tmp_path):
    logs = []
    for name in ("a", "b"):
        mmskip.tune(tiny_lm("llama", layers=6), PROMPTS[:2], held_out=PROMPTS[2:4], floor=0.0, budget=4,
                    out=tmp_path / name, **FAST)
        logs.append([json.loads(x).get("params") for x in (tmp_path / name / LOG_NAME).read_text().splitlines()[1:]])
    assert logs[0] == logs[1]


def test_a_log_of_another_run_is_refused(tuned, tmp_path):
    model, _, _, folder, _ = tuned
    with pytest.raises(ValueError, match="another tuning run"):
        mmskip.tune(model, PROMPTS[:2], held_out=PROMPTS[3:], floor=0.0, budget=5, out=folder, **FAST)
    other_prompts = [p.flip(0) for p in PROMPTS[:3]]  # as many calibration inputs, other contents
    with pytest.raises(ValueError, match="another tuning run"):
        mmskip.tune(model, other_prompts, held_out=PROMPTS[3:], floor=0.0, budget=5, out=folder, **FAST)


def test_a_log_of_other_weights_of_the_same_shapes_is_refused(tuned):
    """A model retrained at the same shapes (same header otherwise) must not continue the old
    search: its logged trials measured the old weights."""
    model, _, _, folder, _ = tuned
    retrained = tiny_lm("llama", layers=6)
    with torch.no_grad():
        retrained.load_state_dict(model.state_dict())
        retrained.lm_head.weight.mul_(1.5)
    with pytest.raises(ValueError, match="other model or weights"):
        mmskip.tune(retrained, PROMPTS[:3], held_out=PROMPTS[3:], floor=0.0, budget=5, out=folder, **FAST)


def test_weights_digest_sees_any_changed_tensor_and_pipeline_components():
    from types import SimpleNamespace

    from mmskip.tuning.trial_log import weights_digest

    a, b = torch.nn.Linear(300, 300), torch.nn.Linear(2, 2)
    before = weights_digest(a)
    assert weights_digest(a) == before and len(before) == 16
    with torch.no_grad():
        a.weight[-1, -1] += 1.0  # in the tail every large tensor's sample keeps
    assert weights_digest(a) != before
    pipe = SimpleNamespace(components={"unet": a, "vae": b, "scheduler": object()})
    digest = weights_digest(pipe)
    with torch.no_grad():
        b.bias.zero_()
    assert weights_digest(pipe) != digest


def test_another_floor_reuses_the_logged_search(tuned):
    model, _, _, folder, r = tuned
    n = len((folder / LOG_NAME).read_text().splitlines())
    other = mmskip.tune(model, PROMPTS[:3], held_out=PROMPTS[3:], floor=0.5, budget=5, out=folder, **FAST)
    assert len((folder / LOG_NAME).read_text().splitlines()) == n and other.floor == 0.5


def test_save_load_apply(tuned, tmp_path):
    model, before, _, _, r = tuned
    r.save(tmp_path)
    back = TuneResult.load(tmp_path)
    assert back.best.key == r.best.key and [m.candidate.key for m in back.measured] == [m.candidate.key for m in r.measured]
    assert back.table() == r.table() and "baseline" in r.table()
    fig = r.plot(tmp_path / "front.png")
    assert (tmp_path / "front.png").stat().st_size > 0 and fig is not None
    if r.best.configs:
        assert mmskip.SkipConfig.from_pretrained(tmp_path) == r.best.configs[0]
        handle = r.apply(model)
        handle.remove()
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_floor_nobody_reaches_returns_the_baseline_with_the_front():
    def never(outputs, reference):
        return 0.0

    r = mmskip.tune(tiny_lm("llama", layers=6), PROMPTS[:2], held_out=PROMPTS[2:4], floor=0.5, metric=never,
                    budget=3, **FAST)
    assert r.best.family == "baseline" and "baseline is returned" in r.message
    assert len(r.measured) >= 2 and r.metric == "never"


def test_interrupted_search_keeps_its_log_and_continues(tmp_path):
    calls = {"n": 0}

    def flaky(outputs, reference):
        calls["n"] += 1
        if calls["n"] == 4:  # the 4th scoring: baseline check + 2 trials done
            raise KeyboardInterrupt
        return 1.0

    model = tiny_lm("llama", layers=6)
    with pytest.raises(KeyboardInterrupt):
        mmskip.tune(model, PROMPTS[:2], held_out=PROMPTS[2:4], floor=0.5, metric=flaky, budget=4, out=tmp_path, **FAST)
    done = len((tmp_path / LOG_NAME).read_text().splitlines()) - 1
    assert done == 2
    r = mmskip.tune(model, PROMPTS[:2], held_out=PROMPTS[2:4], floor=0.5, metric=flaky, budget=4, out=tmp_path, **FAST)
    assert r.trials == 4 and len((tmp_path / LOG_NAME).read_text().splitlines()) - 1 == 4


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(inputs=[]), ValueError, "empty"),
    (dict(inputs="a prompt"), TypeError, "list of prompts"),
    (dict(inputs=["text"]), ValueError, "tokenizer"),
    (dict(budget=0), TuneError, "at least 1"),
    (dict(budget="soon"), TuneError, "neither a number"),
    (dict(budget="0.001s"), TuneError, "too small"),
    (dict(floor="high"), TuneError, "floor must be a number"),
    (dict(metric="bleu"), TuneError, "not one of this target's metrics"),
    (dict(metric=lambda o, r: 1 / 0), TuneError, "raised ZeroDivisionError"),
    (dict(repeats=1), TuneError, "repeats"),
    (dict(timed_inputs=0), TuneError, "timed_inputs"),
])
def test_bad_input_is_refused_before_any_search(kwargs, error, match):
    args = dict(inputs=PROMPTS[:2], held_out=PROMPTS[2:4], floor=0.0, budget=2, **FAST)
    args.update(kwargs)
    model = tiny_lm("llama", layers=4)
    with pytest.raises(error, match=match):
        mmskip.tune(model, **args)


def test_one_input_without_held_out_is_refused():
    with pytest.raises(TuneError, match="held_out"):
        mmskip.tune(tiny_lm("llama", layers=4), PROMPTS[:1], budget=2, **FAST)


def test_unsupported_target():
    with pytest.raises(UnsupportedTargetError, match="cannot tune a Linear"):
        mmskip.tune(torch.nn.Linear(2, 2), PROMPTS[:2], budget=2, **FAST)


def test_parse_budget():
    assert parse_budget(40) == (40, None)
    assert parse_budget("10m") == (None, 600.0) and parse_budget("1h30m") == (None, 5400.0)
    assert parse_budget("90s") == (None, 90.0) and parse_budget("12") == (12, None)


def test_a_fresh_search_tries_the_declared_seeds_first(tuned):
    _, _, _, folder, _ = tuned
    first = [json.loads(x)["candidate"]["label"] for x in (folder / LOG_NAME).read_text().splitlines()[1:6]]
    seeds = {"layer_skip speedup=1.5 phase=decode", "layer_skip speedup=2 phase=decode",
             "ffn_skip threshold=0.95 max_skip=0.25 span=2",
             "void_layers alpha=0.5 max_skip=0.25 min_void_fraction=0.5",
             "self_speculative skip_ratio=0.45 max_draft=10 confidence=0.6 lookup_max_n=0",
             "self_speculative skip_ratio=0.2 max_draft=10 confidence=0.6 lookup_max_n=4"}
    assert len(set(first)) == 5 and set(first) <= seeds  # a budget of 5 trials: 5 of the 6 seeds


def test_missing_optuna_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "optuna", None)  # what an environment without optuna gives
    with pytest.raises(ImportError, match=r"mmskip\[tune\]"):
        mmskip.tune(tiny_lm("llama", layers=4), PROMPTS[:2], held_out=PROMPTS[2:4], budget=2, **FAST)
