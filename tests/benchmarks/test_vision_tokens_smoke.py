"""``benchmarks/vision_tokens.py --smoke`` runs every config end to end on a tiny random LLaVA in seconds."""

from __future__ import annotations

import json
import math


def test_smoke_run_covers_every_config(load_bench, tmp_path, capsys):
    bench = load_bench("vision_tokens")
    out = tmp_path / "vt.json"
    res = bench.main(["--smoke", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(res))
    assert saved["meta"]["model"] == bench.SMOKE_MODEL and saved["meta"]["n_per_type"] == 4
    rows = saved["rows"]
    want = [(s.name, s.signal) for s in bench.configs(saved["meta"]["num_layers"], saved["meta"]["n_vision"])]
    assert [(r["config"], r["signal"]) for r in rows] == want
    kinds = {r["kind"] for r in rows}
    assert kinds == {"plain", "mod", "fastv", "random", "pool"}
    for r in rows:
        nums = [
            r[k]
            for k in (
                "flops_predicted",
                "flops_measured",
                "flops_eager_measured",
                "kv_predicted",
                "kv_measured",
                "prefill_speedup",
                "acc_digit",
                "acc_count",
                "acc_sum",
                "acc_all",
            )
        ]
        assert all(isinstance(x, float) and math.isfinite(x) for x in nums), r
        assert abs(r["flops_predicted"] - r["flops_measured"]) <= 0.05 * r["flops_measured"], r
        assert abs(r["kv_predicted"] - r["kv_measured"]) <= 0.05 * r["kv_measured"], r
        # the cache holds exactly the tokens that ran
        assert r["kv_bytes_predicted"] == r["kv_bytes_measured"]
        if r["kind"] == "plain":
            assert r["flops_measured"] == r["kv_measured"] == 1.0
        else:  # every technique skips something, and the KV cache shrinks with it
            assert r["flops_measured"] < 1.0 and r["kv_measured"] < 1.0
    # FastV drops once (the same kept set in every layer from K on); random drops stay dropped (nested)
    assert all(r["kept_sets_identical"] for r in rows if r["kind"] == "fastv")
    assert all(r["kept_sets_nested"] for r in rows if r["kind"] == "random")
    prd = next(r for r in rows if r["config"] == "p-MoD PRD")
    rand = next(r for r in rows if r["config"] == "random (PRD counts)")
    assert rand["kept_vision_per_layer"] == prd["kept_vision_per_layer"]
    pool = next(r for r in rows if r["kind"] == "pool")
    assert abs(pool["kv_measured"] - pool["flops_measured"]) < 1e-9  # 16 of 64 vision tokens, every layer
    for name in ("vt.md", "vt.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| p-MoD PRD | attention |" in capsys.readouterr().out
