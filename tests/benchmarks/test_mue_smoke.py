"""``benchmarks/mue.py --smoke`` runs every kind of config end to end on a tiny random Florence-2."""

from __future__ import annotations

import json
import math


def test_smoke_run_writes_finite_results(load_bench, tmp_path, capsys):
    bench = load_bench("mue", "bench_mue")
    out = tmp_path / "mue.json"
    res = bench.main(["--smoke", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(res))
    meta, rows = saved["meta"], saved["rows"]
    assert meta["model"] == bench.SMOKE_MODEL and meta["items"] == 4
    assert {r["kind"] for r in rows} == {"plain", "mue", "truncate", "calm"}
    keys = ("em_all", "em_caption", "em_sum", "em_count", "em_position", "bleu", "agree_unmodified",
            "encoder_layer_tokens", "decoder_layer_tokens", "decode_time_fraction", "decoder_time_fraction",
            "ms_per_strip_config", "ms_per_strip_unmodified")
    for r in rows:
        assert all(isinstance(r[k], float) and math.isfinite(r[k]) for k in keys), r
        assert 0 < r["encoder_layer_tokens"] <= 1 and 0 < r["decoder_layer_tokens"] <= 1
        assert len(r["preds"]) == 4
    plain = rows[0]
    assert plain["kind"] == "plain" and plain["agree_unmodified"] == 1.0
    assert plain["encoder_layer_tokens"] == plain["decoder_layer_tokens"] == 1.0
    trunc = next(r for r in rows if r["kind"] == "truncate")
    assert trunc["decoder_layer_tokens"] == 0.5 and trunc["encoder_layer_tokens"] == 1.0  # 1 of 2 decoder layers
    dec_only = next(r for r in rows if r["config"] == "MuE dec 0.9")
    assert dec_only["encoder_layer_tokens"] == 1.0  # encoder thresholds None: no encoder exits
    for name in ("mue.md", "mue.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| unmodified |" in (tmp_path / "mue.md").read_text()
    assert "| CALM conf 0.9 |" in capsys.readouterr().out


def test_t5gemma2_smoke_run_reports_speed_and_flops_only(load_bench, tmp_path):
    """``--family t5gemma2 --smoke``: a random T5Gemma 2; MuE's fractions come from its stats; the table
    says the weights are random (speed and FLOPs only)."""
    bench = load_bench("mue", "bench_mue_t5g")
    out = tmp_path / "mue_t5gemma2.json"
    res = bench.main(["--smoke", "--family", "t5gemma2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert res["meta"]["weights"] == "random"
    rows = {r["config"]: r for r in res["rows"]}
    assert set(rows) == {"unmodified", "MuE dec 0.9", "truncate dec 1/2"}
    mue = rows["MuE dec 0.9"]
    assert 0 < mue["decoder_layer_tokens"] <= 1 and mue["encoder_layer_tokens"] == 1.0
    assert 0 < mue["flops_fraction"] <= 1 and math.isfinite(mue["time_fraction"])
    assert rows["truncate dec 1/2"]["decoder_layer_tokens"] == 0.5
    assert "random weights: speed and FLOPs only, not quality" in (tmp_path / "mue_t5gemma2.md").read_text()
