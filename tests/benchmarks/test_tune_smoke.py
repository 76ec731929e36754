"""benchmarks/tune.py --smoke: a pipeline and an LM tuned end to end; JSON, table and plot written."""

import json

import pytest

from mmskip.tuning.trial_log import LOG_NAME


def _stale_log(runs, name):
    (runs / name).mkdir(parents=True)
    (runs / name / LOG_NAME).write_text(json.dumps({"header": {"model": "other weights"}}) + "\n")


def test_a_stale_trial_log_stops_the_run_and_names_fresh(load_bench, tmp_path):
    bench = load_bench("tune")
    _stale_log(tmp_path / "runs", "digits-dit")
    with pytest.raises(SystemExit, match="digits-dit: .*logs another tuning run.*rerun with --fresh"):
        bench.main(["--smoke", "--out", str(tmp_path / "tune.json"), "--runs", str(tmp_path / "runs")])


def test_tune_benchmark_smoke(load_bench, tmp_path):
    bench = load_bench("tune")
    out = tmp_path / "tune.json"
    _stale_log(tmp_path / "runs", "stdlib-lm")  # --fresh starts it over
    res = bench.main(["--smoke", "--out", str(out), "--runs", str(tmp_path / "runs"), "--fresh"])
    saved = json.loads(out.read_text())
    assert {r["model"] for r in saved["rows"]} == {"digits-dit", "stdlib-lm"} == {r["model"] for r in res["rows"]}
    for row in saved["rows"]:
        assert row["tuned_quality"] >= row["floor"] and row["trials"] == 2
    dit = next(r for r in saved["rows"] if r["model"] == "digits-dit")
    assert dit["fewer"] is not None  # the fewer-steps front is always measured for pipelines
    assert out.with_suffix(".md").read_text().count("speedup (median, IQR)") == 2
    assert out.with_suffix(".png").stat().st_size > 0
