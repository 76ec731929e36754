"""benchmarks/overhead.py --smoke: an LM and a pipeline technique measured end to end; the zero-skip
configs really skip nothing (FLOPs fraction 1.0, outputs equal to the baseline's)."""

import json


def test_overhead_benchmark_smoke(load_bench, tmp_path, threads):
    bench = load_bench("overhead")
    out = tmp_path / "overhead.json"
    res = bench.main(["--smoke", "--techniques", "ffn_skip,feature_inheritance", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(res["rows"], default=str))
    got = {(r["technique"], r["model"]) for r in saved["rows"]}
    assert got == {("ffn_skip", "stdlib-lm"), ("feature_inheritance", "digits-dit")}
    for row in saved["rows"]:
        assert row["status"] == "measured", row["status"]
        assert row["zero_flops_fraction"] == 1.0 and row["zero_outputs_equal"] and row["zero_skips_nothing"]
        assert row["zero_quality"][row["metric"]] == (1.0 if row["metric"] == "agreement" else 100.0)
        for key in ("zero", "default", "null"):
            lo, hi = row[f"{key}_spread"]
            assert lo <= row[f"{key}_speedup"] <= hi and row[f"{key}_timing"]["pairs"] == 3
        assert abs(row["zero_overhead_pct"] - 100 * (1 / row["zero_speedup"] - 1)) < 1e-9
        lo, hi = row["zero_vs_null_iqr_pct"]
        assert lo <= row["zero_vs_null_overhead_pct"] <= hi
        assert len(row["zero_timing"]["rounds_s"]) == len(row["null_timing"]["baseline_rounds_s"]) == 3
        assert 0 < row["flops_fraction"] <= 1.0 and row["flops_bound"] == 1.0 / row["flops_fraction"]
        assert row["speedup_over_bound"] == row["default_speedup"] / row["flops_bound"]
        assert row["metric"] in row["quality"] and row["default_config"]["technique"] == row["technique"]
    inherit = next(r for r in saved["rows"] if r["technique"] == "feature_inheritance")
    assert inherit["flops_fraction"] < 1.0  # the default (a seed of its search space) skips
    md = out.with_suffix(".md").read_text()
    assert "zero-skip overhead % (IQR)" in md and "zero config skips" not in md


def test_overhead_lists_unmeasured_techniques(load_bench, tmp_path, threads):
    bench = load_bench("overhead")
    out = tmp_path / "overhead.json"
    res = bench.main(["--smoke", "--techniques", "first_routers", "--out", str(out)])
    assert [(r["technique"], r["status"]) for r in res["rows"]] == [
        ("first_routers", "not measured: no trained routers ship in the zoo")]
    assert "not measured: no trained routers" in out.with_suffix(".md").read_text()


def test_overhead_merges_runs_into_one_table(load_bench, tmp_path, threads):
    bench = load_bench("overhead")
    a, b, joined = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "all.json"
    bench.main(["--smoke", "--techniques", "first_routers", "--out", str(a)])
    bench.main(["--smoke", "--techniques", "first_routers", "--models", "stdlib-lm", "--out", str(b)])
    res = bench.main(["--merge", str(a), str(b), "--out", str(joined)])
    assert res["meta"]["merged"] == [str(a), str(b)]
    assert json.loads(joined.read_text())["rows"] == res["rows"]
    # a's rows (first_routers on stdlib-lm) come again in b: b's replaces it, in a's place
    assert [(r["technique"], r["model"]) for r in res["rows"]] == [("first_routers", "stdlib-lm")]
    assert joined.with_suffix(".md").read_text().count("no trained routers ship") == 1
    # merging a merged table lists every run behind it, not the merged file
    again = bench.main(["--merge", str(joined), str(a), "--out", str(tmp_path / "again.json")])
    assert again["meta"]["merged"] == [str(a), str(b), str(a)]


def test_overhead_compiled_mode_times_compiled_decoding(load_bench, tmp_path, threads):
    bench = load_bench("overhead")
    out = tmp_path / "compiled.json"
    res = bench.main(["--smoke", "--compile", "eager", "--techniques", "layer_skip,feature_inheritance",
                      "--out", str(out)])
    rows = {r["technique"]: r for r in res["rows"]}
    assert res["meta"]["mode"] == "compiled (eager)"
    ls = rows["layer_skip"]
    assert ls["status"] == "measured" and ls["compiled_outputs_equal_eager"] is True
    assert ls["zero_skips_nothing"] and ls["default_timing"]["pairs"] == 3
    assert ls["compiled_cache"] == "static" and ls["graphs_in_timed_rounds"] == 0
    fi = rows["feature_inheritance"]  # the pipeline's denoiser compiled in place, shared by every config
    assert fi["status"] == "measured" and fi["zero_skips_nothing"] and fi["flops_fraction"] < 1.0
    assert fi["graphs_in_timed_rounds"] == 0 and "compiled_cache" not in fi
    assert fi["compiled_vs_eager"]["psnr"] > 60  # the compiled denoiser computes the eager images
    assert out.with_suffix(".md").read_text().startswith("| technique")


def test_pairs_note_names_each_rows_pair_count_when_merged_runs_differ(load_bench):
    bench = load_bench("overhead")
    row = lambda model, n: {"model": model, "technique": "t", "null_timing": {"pairs": n}}  # noqa: E731
    assert bench.pairs_note({"meta": {"repeats": 9}, "rows": [row("a", 15), row("b", 15)]}) == "15 pairs per figure"
    assert bench.pairs_note({"meta": {"repeats": 9}, "rows": [row("a", 9), row("b", 31), row("c", 9)]}) == (
        "pairs per figure: 9 (a / t, c / t); 31 (b / t)")
    assert bench.pairs_note({"meta": {"repeats": 7}, "rows": []}) == "7 pairs per figure"
