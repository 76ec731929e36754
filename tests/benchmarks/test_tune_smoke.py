"""benchmarks/tune.py --smoke: a pipeline and an LM tuned end to end; JSON, table and plot written."""

import json


def test_tune_benchmark_smoke(load_bench, tmp_path):
    bench = load_bench("tune")
    out = tmp_path / "tune.json"
    res = bench.main(["--smoke", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert {r["model"] for r in saved["rows"]} == {"digits-dit", "stdlib-lm"} == {r["model"] for r in res["rows"]}
    for row in saved["rows"]:
        assert row["tuned_quality"] >= row["floor"] and row["trials"] == 2
    dit = next(r for r in saved["rows"] if r["model"] == "digits-dit")
    assert dit["fewer"] is not None  # the fewer-steps front is always measured for pipelines
    assert out.with_suffix(".md").read_text().count("speedup (median, IQR)") == 2
    assert out.with_suffix(".png").stat().st_size > 0
