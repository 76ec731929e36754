import json

import pytest

from mmskip import schedules


@pytest.mark.parametrize(
    "L,s,keep",
    [(30, 5, (0, 6, 12, 18, 24, 29)), (32, 5, (0, 6, 12, 18, 24, 31)), (24, 2, (0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 23))],
)
def test_unified_paper_vectors(L, s, keep):
    assert schedules.unified(s, L).keep() == keep
    assert schedules.unified(s).keep(L) == keep


@pytest.mark.parametrize("L,s", [(24, 1.5), (16, 1.5), (32, 1.2), (12, 1.9)])
def test_unified_below_two_spreads_skips_over_the_middle(L, s):
    sched = schedules.unified(s, L)
    skipped = sched.skip()
    assert len(sched.keep()) == int(L / s)
    assert 0 not in skipped and L - 1 not in skipped
    gaps = [b - a for a, b in zip(skipped, skipped[1:])]
    assert not gaps or min(gaps) >= 2 or len(skipped) > (L - 2) // 2  # no contiguous block unless forced
    assert skipped[0] < L // 2 < skipped[-1] or len(skipped) == 1


def test_unified_1_5_on_24_layers():
    assert schedules.unified(1.5, 24).skip() == (2, 5, 7, 10, 13, 16, 18, 21)


def test_unified_speedup_one_keeps_everything():
    assert schedules.unified(1.0, 12).skip() == ()


@pytest.mark.parametrize("bad", [0.5, 0.0, -2, float("nan")])
def test_unified_rejects_speedup_below_one(bad):
    with pytest.raises(ValueError, match="speedup must be >= 1"):
        schedules.unified(bad)


def test_unified_rejects_speedup_above_depth():
    with pytest.raises(ValueError, match="exceeds the number of layers"):
        schedules.unified(40, 32)
    with pytest.raises(ValueError, match="exceeds the number of layers"):
        schedules.unified(40).keep(32)


def test_progressive_matches_p_mod():
    r = schedules.progressive().ratios(32)
    assert sum(r) / 32 == pytest.approx(0.5375)
    assert r[0] == 1.0 and r[-1] == 0.15
    assert all(a >= b for a, b in zip(r, r[1:]))


def test_interval_and_explicit():
    assert schedules.interval(3).keep(10) == (0, 3, 6, 9)
    assert schedules.interval(2, offset=3).keep(8) == (0, 1, 2, 3, 5, 7)
    assert schedules.explicit(skip=[1, 4]).skip(6) == (1, 4)
    assert schedules.explicit(keep=[0, 5]).keep(6) == (0, 5)
    assert schedules.explicit(ratios=[1.0, 0.5, 0.0]).ratios() == (1.0, 0.5, 0.0)


@pytest.mark.parametrize(
    "make,msg",
    [
        (lambda: schedules.interval(0), "every must be"),
        (lambda: schedules.explicit(keep=[]), "keep at least one"),
        (lambda: schedules.explicit(skip=[1], keep=[2]), "exactly one"),
        (lambda: schedules.explicit(skip=[9]).skip(4), "out of range"),
        (lambda: schedules.progressive(ceiling=0.1, floor=0.5), "floor <= ceiling"),
        (lambda: schedules.adaptive(0.9, signal="nope"), "unknown signal"),
        (lambda: schedules.unified(2.0).keep(), "needs the number of items"),
    ],
)
def test_bad_schedules_raise_clear_errors(make, msg):
    with pytest.raises(ValueError, match=msg):
        make()


@pytest.mark.parametrize(
    "sched",
    [
        schedules.unified(3.0, 24),
        schedules.interval(4, 1),
        schedules.explicit(skip=[2, 3]),
        schedules.explicit(ratios=[1.0, 0.25]),
        schedules.progressive(num=16),
        schedules.adaptive(0.9, "relative_change", warmup=2, max_skip=0.3),
    ],
)
def test_json_round_trip(sched):
    again = schedules.from_dict(json.loads(sched.to_json()))
    assert again == sched
    n = None if getattr(sched, "num", None) or getattr(sched, "ratio_list", None) else 16
    assert again.ratios(n) == sched.ratios(n)


def test_adaptive_decisions():
    assert schedules.adaptive(0.9, "cosine").compute(0.5) and not schedules.adaptive(0.9, "cosine").compute(0.95)
    assert schedules.adaptive(0.1, "relative_change").compute(0.2)
    assert not schedules.adaptive(0.1, "relative_change").compute(0.05)


def test_decaying_threshold_at():
    s = schedules.decaying(0.9, decay=0.5, floor=0.3, warmup=2)
    assert [s.threshold_at(t) for t in range(4)] == [0.9, 0.45, 0.3, 0.3]
    assert schedules.decaying(0.95, decay=1.0, floor=0.5).threshold_at(100) == 0.95
    assert s.ratios(6) == (1.0,) * 6 and s.skip(6) == ()  # decided at run time
    assert s.compute(0.9) and not s.compute(0.91) and not s.compute(0.46, t=1)  # exit: strictly above
    assert schedules.decaying(1.0, floor=1.0).compute(1.0)  # 1.0 never exits a cosine (at most 1)
    with pytest.raises(ValueError, match="t must be >= 0"):
        s.threshold_at(-1)


@pytest.mark.parametrize(
    "kwargs,exc,msg",
    [
        ({"threshold": 1.5}, ValueError, r"threshold must lie in \[0, 1\]"),
        ({"threshold": float("nan")}, ValueError, r"threshold must lie in \[0, 1\]"),
        ({"threshold": 0.9, "floor": -0.1}, ValueError, r"floor must lie in \[0, 1\]"),
        ({"threshold": 0.8, "floor": 0.9}, ValueError, "must not exceed threshold"),
        ({"threshold": 0.9, "decay": 0.0}, ValueError, r"decay must lie in \(0, 1\]"),
        ({"threshold": 0.9, "decay": 1.01}, ValueError, r"decay must lie in \(0, 1\]"),
        ({"threshold": 0.9, "warmup": -1}, ValueError, "warmup must be >= 0"),
        ({"threshold": 0.9, "warmup": 1.5}, TypeError, "warmup"),
        ({"threshold": "high"}, TypeError, "threshold"),
    ],
)
def test_decaying_rejects_bad_fields(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        schedules.decaying(**kwargs)


def test_decaying_round_trip():
    s = schedules.decaying(0.94, decay=0.98, floor=0.85, warmup=2)
    again = schedules.from_dict(json.loads(s.to_json()))
    assert again == s and isinstance(again, schedules.DecayingThreshold)
    assert s.to_dict() == {"kind": "decaying", "threshold": 0.94, "decay": 0.98, "floor": 0.85, "warmup": 2}
    assert "DecayingThreshold" in schedules.__all__ and "decaying" in schedules.__all__


@pytest.mark.parametrize(
    "given, words",
    [
        (None, ["takes a dict or JSON object", "NoneType"]),
        ("{not json", ["not valid JSON", "'{not json'"]),
        ("[1, 2]", ["takes a dict or JSON object", "list"]),
        ({"every": 2}, ["has no 'kind'", "known kinds", "interval"]),
        ({"kind": "nope"}, ["unknown kind 'nope'", "known kinds"]),
        ({"kind": "interval", "evry": 2}, ["'interval'", "no field(s) ['evry']", "['every', 'offset', 'num']"]),
        ({"kind": "interval", "every": "2"}, ["'interval'", "every", "'2'", "['every', 'offset', 'num']"]),
        ({"kind": "interval", "every": 0}, ["'interval'", "every must be an integer >= 1, got 0"]),
        ('{"kind": "unified", "speedup": 0.5}', ["'unified'", "speedup", "0.5", "['speedup', 'num']"]),
    ],
)
def test_from_dict_errors_are_one_clear_value_error(given, words):
    with pytest.raises(ValueError) as err:
        schedules.from_dict(given)
    for w in words:
        assert w in str(err.value), (w, str(err.value))
