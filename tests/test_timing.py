"""The paired timing module: interleaving, warm-up exclusion, median and spread (no timing thresholds)."""

import pytest

from mmskip.timing import Timing, paired, repeated


def test_rounds_interleave_alternate_and_drop_the_warmup():
    calls: list[str] = []
    out = paired(lambda: calls.append("base"), {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                 repeats=3, warmup=1)
    # round 0 (warm-up): base first; round 1: candidates reversed, base last; round 2 as round 0 ...
    assert calls == ["base", "a", "b", "b", "a", "base", "base", "a", "b", "b", "a", "base"]
    assert set(out) == {"a", "b"}
    assert all(t.pairs == 3 for t in out.values())


def test_summary_statistics_come_from_the_paired_ratios():
    t = Timing(baseline_s=(2.0, 2.0, 3.0, 4.0), candidate_s=(1.0, 2.0, 1.0, 1.0))
    assert t.ratios == [2.0, 1.0, 3.0, 4.0]
    assert t.speedup == 2.5
    lo, hi = t.spread
    assert lo == pytest.approx(1.75) and hi == pytest.approx(3.25)
    assert t.seconds == 1.0 and t.baseline_seconds == 2.5
    assert t.summary() == "2.50x (1.75-3.25, 4 pairs)"
    assert t.to_dict()["pairs"] == 4


def test_bound_warning_fires_only_beyond_the_spread():
    fast = Timing(baseline_s=(3.0, 3.0, 3.0), candidate_s=(1.0, 1.0, 1.0))
    assert fast.bound_warning(0.5) is not None and "FLOPs bound 2.00x" in fast.bound_warning(0.5)
    assert fast.bound_warning(0.34) is None
    assert fast.bound_warning(None) is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(repeats=2), "repeats >= 3"),
    (dict(warmup=-1), "warmup must be >= 0"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        paired(lambda: None, {"a": lambda: None}, **kwargs)
    with pytest.raises(ValueError, match="at least one candidate"):
        paired(lambda: None, {})


def test_repeated_drops_the_warmup_calls_and_times_each_call():
    calls = []
    secs = repeated(lambda: calls.append(1), repeats=4, warmup=2)
    assert len(calls) == 6 and len(secs) == 4 and all(s >= 0 for s in secs)
    with pytest.raises(ValueError, match="repeats >= 1"):
        repeated(lambda: None, repeats=0)


def test_to_dict_puts_the_flops_bound_and_its_warning_beside_the_speedup():
    t = Timing((1.0, 1.0, 1.0, 1.0), (0.5, 0.25, 0.2, 0.1))  # ratios 2, 4, 5, 10
    assert "flops_bound" not in t.to_dict()
    d = t.to_dict(0.5)
    assert d["speedup"] == 4.5 and d["spread"] == [3.5, 6.25] and d["flops_bound"] == 2.0
    assert d["bound_warning"] == t.bound_warning(0.5) and d["bound_warning"].startswith("measured 4.50x")
    assert t.to_dict(0.1)["bound_warning"] is None


def test_candidate_setup_and_teardown_run_untimed_around_every_timed_call():
    from mmskip.timing import Candidate

    calls: list[str] = []
    cand = Candidate(lambda: calls.append("a"), setup=lambda: calls.append("+a"), teardown=lambda: calls.append("-a"))
    base = Candidate(lambda: calls.append("base"), setup=lambda: calls.append("+base"))
    out = paired(base, {"a": cand}, repeats=3, warmup=0)
    assert calls == ["+base", "base", "+a", "a", "-a", "+a", "a", "-a", "+base", "base",
                     "+base", "base", "+a", "a", "-a"]
    assert out["a"].pairs == 3
    calls.clear()
    assert len(repeated(cand, repeats=2, warmup=1)) == 2
    assert calls == ["+a", "a", "-a"] * 3


def test_candidate_teardown_runs_when_the_call_raises():
    from mmskip.timing import Candidate

    calls: list[str] = []

    def boom() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        paired(lambda: None, {"a": Candidate(boom, teardown=lambda: calls.append("-a"))}, repeats=3)
    assert calls == ["-a"]


def test_candidate_minus_is_timed_inside_the_setup_and_subtracted():
    import time

    from mmskip.timing import Candidate

    calls: list[str] = []
    cand = Candidate(lambda: (calls.append("n"), time.sleep(0.02)), setup=lambda: calls.append("+"),
                     teardown=lambda: calls.append("-"), minus=lambda: calls.append("1"))
    secs = repeated(cand, repeats=1, warmup=0)
    assert calls == ["+", "1", "n", "-"]
    assert 0.0 < secs[0]


def test_once_returns_the_seconds_and_the_result_of_one_call():
    from mmskip.timing import Candidate, once

    calls: list[str] = []
    secs, out = once(Candidate(lambda: calls.append("x") or 42, setup=lambda: calls.append("+")))
    assert out == 42 and secs >= 0 and calls == ["+", "x"]
