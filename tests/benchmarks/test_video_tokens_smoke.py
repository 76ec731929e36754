"""``benchmarks/video_tokens.py --smoke`` runs every config and the stream on a tiny random video model."""

from __future__ import annotations

import json
import math


def test_smoke_run_covers_every_config(load_bench, tmp_path, capsys):
    bench = load_bench("video_tokens")
    out = tmp_path / "vt.json"
    res = bench.main(["--smoke", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(res))
    rows = saved["rows"]
    assert [(r["config"], r["signal"]) for r in rows] == [(s.name, s.signal) for s in bench.configs()]
    for r in rows:
        nums = [r[k] for k in ("flops_predicted", "flops_measured", "kv_predicted", "kv_measured", "prefill_speedup",
                               "vision_skipped_predicted", "vision_skipped_measured", "acc_all")]
        assert all(isinstance(x, float) and math.isfinite(x) for x in nums), r
        # predicted vs measured within 2 % (the bar), FLOPs and KV
        assert abs(r["flops_predicted"] - r["flops_measured"]) <= 0.02 * r["flops_measured"], r
        assert abs(r["kv_predicted"] - r["kv_measured"]) <= 0.02 * r["kv_measured"], r
        if r["kind"] in ("videomod", "random", "fastv"):  # per-frame quotas: the schedule predicts exactly
            assert abs(r["vision_skipped_predicted"] - r["vision_skipped_measured"]) < 1e-9, r
            assert r["flops_measured"] < 1.0 and r["kv_measured"] < 1.0
    by = {(r["config"], r["signal"]): r for r in rows}
    assert by[("random r=0.2", "random")]["kv_measured"] == by[("VideoMoD r=0.2", "attention")]["kv_measured"]
    plain, *mod = saved["stream"]
    assert plain["videos"] == 2 and all(s["kv_bytes_per_frame"] < plain["kv_bytes_per_frame"] for s in mod)
    for name in ("vt.md", "vt.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| VideoMoD r=0.2 | attention |" in capsys.readouterr().out
