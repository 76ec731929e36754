"""benchmarks/vision_tokens_sweep.py --smoke: every method at every keep ratio on the same questions,
the FLOPs each one leaves, the paired margins, and that the model comes back unchanged."""

import json

import pytest


def test_vision_tokens_sweep_smoke(load_bench, tmp_path, threads):
    bench = load_bench("vision_tokens_sweep")
    out = tmp_path / "sweep.json"
    res = bench.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text())["summary"] == json.loads(json.dumps(res["summary"]))
    rows = res["rows"]
    assert [(r["name"], r["ratio"]) for r in rows] == [
        ("unmodified", 1.0),
        ("p-MoD attention", 0.5), ("p-MoD norm", 0.5), ("random", 0.5), ("pool 1x2", 0.5),
        ("p-MoD attention", 0.25), ("p-MoD norm", 0.25), ("random", 0.25), ("pool 2x2", 0.25)]
    by = {(r["name"], r["ratio"]): r for r in rows}
    assert by["unmodified", 1.0]["flops_fraction"] == 1.0 and by["unmodified", 1.0]["agree_unmodified"] == 1.0
    for r in (0.5, 0.25):
        # random dropping keeps p-MoD's per-layer counts and costs no signal: the norm signal's FLOPs
        assert by["random", r]["flops_fraction"] == pytest.approx(by["p-MoD norm", r]["flops_fraction"])
        assert by["random", r]["flops_fraction"] < by["p-MoD attention", r]["flops_fraction"] < 1.0
    assert by["pool 2x2", 0.25]["flops_fraction"] < by["pool 1x2", 0.5]["flops_fraction"] < 1.0
    for r in rows:
        assert 0 <= r["right"] <= res["meta"]["questions"]
        assert r["acc_all"] == pytest.approx(r["right"] / res["meta"]["questions"])
    assert [s["ratio"] for s in res["summary"]] == [0.5, 0.25]
    assert out.with_suffix(".png").stat().st_size > 0 and "Best config at each keep ratio" in out.with_suffix(".md").read_text()


def test_paired_margin_is_the_mean_difference_and_its_standard_error(load_bench):
    bench = load_bench("vision_tokens_sweep")
    diff, se = bench.paired_margin([True, True, False, True], [False, True, False, False])
    assert diff == pytest.approx(0.5)  # differences 1, 0, 0, 1
    assert se == pytest.approx((1 / 3) ** 0.5 / 2)  # sample variance 1/3, over 4 questions


def test_routers_need_a_ratio(load_bench):
    bench = load_bench("vision_tokens_sweep")
    assert bench.router_folders(["0.25=runs/r"]) == {0.25: "runs/r"}
    with pytest.raises(SystemExit, match="RATIO=FOLDER"):
        bench.router_folders(["runs/r"])
