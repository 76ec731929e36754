"""benchmarks/relactrl.py runs every method and writes its table (tiny random branches)."""

from __future__ import annotations


def test_relactrl_benchmark_smoke(load_bench, threads):
    bench = load_bench("relactrl")
    result = bench.main(["--smoke", "--threads", "1"])
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["no control (base)", "full ControlNet", "full, skip 3 least relevant", "RelaCtrl"]
    full, rela, drop = rows["full ControlNet"], rows["RelaCtrl"], rows["full, skip 3 least relevant"]
    assert full["params_vs_full"] == 1.0 and 0 < rela["params_vs_full"] < 0.25
    assert 0 < rela["branch_flops_vs_full"] < drop["branch_flops_vs_full"] < 1.0
    assert 0 < drop["params_vs_full"] < 1.0  # its three skipped blocks do not count
    assert rows["no control (base)"]["branch_gflops"] == 0
    assert all("silhouette IoU" in r and "FID" in r for r in rows.values())
    assert len(result["full_controlnet_seed_band"]) == 1
    text = bench.table(result)
    assert "RelaCtrl" in text and "Seed band" in text
