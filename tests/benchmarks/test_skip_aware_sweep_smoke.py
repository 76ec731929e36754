"""``benchmarks/skip_aware_sweep.py --smoke`` trains and scores two variants on the CPU in seconds."""

from __future__ import annotations


def test_sweep_smoke(load_bench, tmp_path):
    bench = load_bench("skip_aware_sweep", "bench_skip_aware_sweep")
    result = bench.main(["--smoke", "--windows", "4", "--out", str(tmp_path / "s.json")])
    rows = result["rows"]
    assert len(rows) == 2 and all("error" not in r for r in rows.values()), rows
    for r in rows.values():
        assert r["steps"] == 2 and r["perplexity"] > 1 and len([k for k in r if k.startswith("exit")]) == 3
    assert (tmp_path / "s.md").read_text().count("| 2 |") == 2
