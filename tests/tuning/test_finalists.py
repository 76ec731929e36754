"""Which calibration candidates mmskip.tune confirms on held-out inputs."""

from mmskip.tuning.search import MARGIN, _finalists


def _rec(key, group, q, cost):
    return {"key": key, "group": group, "q": q, "cost": cost}


def test_each_group_sends_its_cheapest_at_the_floor_and_its_cheapest_with_a_margin():
    floor = 35.0
    records = [_rec("fi-13", "fi", 35.1, 0.50), _rec("fi-14", "fi", 35.9, 0.55), _rec("fi-20", "fi", 40.0, 0.80),
               _rec("steps-8", "fewer", 35.5, 0.32), _rec("steps-9", "fewer", 36.2, 0.36),
               _rec("steps-6", "fewer", 30.0, 0.24), _rec("broken", "fi", None, 1.0)]
    keys = [r["key"] for r in _finalists(records, floor, k=1)]
    assert abs(floor * (1 + MARGIN) - 35.7) < 1e-9
    assert {"fi-13", "fi-14", "steps-8", "steps-9"} <= set(keys)  # at the floor, and the cheapest >= 35.7
    assert "fi-20" not in keys and "broken" not in keys
    assert "steps-6" in keys  # the best point just under the floor, for the picture
    assert keys == sorted(keys, key=lambda k: next(r["cost"] for r in records if r["key"] == k))


def test_a_floor_nothing_meets_still_sends_the_best_points_under_it():
    records = [_rec("a", "x", 0.5, 0.4), _rec("b", "x", 0.7, 0.6), _rec("c", "y", 0.6, 0.9)]
    assert [r["key"] for r in _finalists(records, 0.9, k=2)] == ["a", "b"]


def test_a_group_that_missed_the_floor_held_out_sends_its_next_safer_candidate():
    from mmskip.tuning.result import Measured
    from mmskip.tuning.space import Candidate
    from mmskip.tuning.tune import _escalate

    def rec(key, group, q, cost):
        return {**_rec(key, group, q, cost), "candidate": {"settings": {"k": key}}}

    def measured(key, q):
        return Measured(Candidate(settings={"k": key}), {"psnr": q})

    records = [rec("euler-6", "fewer", 37.3, 0.26), rec("euler-7", "fewer", 37.0, 0.29), rec("euler-8", "fewer", 38.7, 0.33),
               rec("euler-9", "fewer", 41.4, 0.36), rec("skip-a", "skip", 36.0, 0.29), rec("fi-low", "fi", 30.0, 0.2)]
    for r in records:
        r["key"] = Candidate(settings={"k": r["key"]}).key
    chosen = [records[0], records[4], records[5]]
    held = [Measured(Candidate(family="baseline"), {"psnr": 100.0}), measured("euler-6", 33.4),
            measured("skip-a", 36.1), measured("fi-low", 28.0)]
    more = _escalate(records, chosen, held, "psnr", 35.0)
    # fewer steps missed held-out: its cheapest candidate above 37.3 on calibration is euler-8 (euler-7 is not
    # safer); step skipping met the floor; inheritance never met it on calibration (only shown for the picture)
    assert [r["candidate"]["settings"]["k"] for r in more] == ["euler-8"]
    assert _escalate(records, chosen + more, held + [measured("euler-8", 36.7)], "psnr", 35.0) == []
