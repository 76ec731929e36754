"""benchmarks/skippipe.py: two short torchrun jobs, the table, the plot and the paper-scale estimate."""

from __future__ import annotations


def test_skippipe_benchmark_smoke(load_bench, threads):
    from mmskip.train.skippipe.launch import SkipPipeJobError

    bench = load_bench("skippipe")
    try:
        result = bench.main(["--smoke"])
    except SkipPipeJobError as e:
        # one gloo rank was seen to die by SIGABRT once in 8 full-suite runs on a loaded 2-core machine
        # (not reproduced alone; cause not found yet): retry once, only for that signal
        if "SIGABRT" not in str(e):
            raise
        result = bench.main(["--smoke"])
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"full pipeline", "SkipPipe 0.5"}
    assert rows["full pipeline"]["iteration_time_saved"] == 0.0
    assert rows["SkipPipe 0.5"]["skip_counts"] == {"1": 2, "2": 2}  # half of 4 microbatches skip each stage
    assert rows["full pipeline"]["skip_counts"] == {"1": 0, "2": 0}
    assert rows["SkipPipe 0.5"]["planned_time_saved"] < 1
    assert all(r["iterations"] >= 2 and r["val_ppl_full"] > 1 for r in rows.values())
    assert {e["model"] for e in result["paper_estimate"]} == {"LLaMa-500M", "LLaMa-1.5B", "LLaMa-8B"}
    assert all(0 < e["iteration_time_saved"] < 1 for e in result["paper_estimate"])
    text = bench.table(result)
    assert "SkipPipe 0.5" in text and "not a measurement" in text
