"""``benchmarks/skip_aware.py --smoke`` measures every config on tiny random models in seconds, so it cannot rot."""

from __future__ import annotations

import json


def test_skip_aware_smoke(load_bench, tmp_path):
    bench = load_bench("skip_aware", "bench_skip_aware")
    out = tmp_path / "smoke.json"
    result = bench.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text())["models"] == json.loads(json.dumps(result["models"]))
    assert out.with_suffix(".png").exists() and "| stdlib-lm (4 layers" in out.with_suffix(".md").read_text()
    for m in result["models"]:
        lossy = {r["config"]: r for r in m["lossy"]}
        assert set(lossy) == {"unified s=1.5", "FFN-SkipLLM", "void layers"}
        assert 0 < lossy["unified s=1.5"]["kept_flops"] < 1  # decode skips layers; the prefill is subtracted
        assert all(0 <= r["teacher_forced"] <= 1 for r in lossy.values())
        speed = {r["config"]: r for r in m["speed"]}
        # speculative decoding is lossless: every output equals plain generate's
        assert all(r["identical"] == "2/2" for r in speed.values()), speed
        assert any(name.startswith("early exit") for name in speed) and "SWIFT r=0.3" in speed


def test_merge_reruns_one_model_and_keeps_the_others(load_bench, tmp_path):
    bench = load_bench("skip_aware", "bench_skip_aware")
    out = tmp_path / "smoke.json"
    first = bench.main(["--smoke", "--out", str(out)])
    again = bench.main(["--smoke", "--merge", "--models", "stdlib-lm-skip", "--out", str(out)])
    saved = json.loads(out.read_text())["models"]
    assert [m["model"] for m in saved] == ["stdlib-lm", "stdlib-lm-skip"] == [m["model"] for m in again["models"]]
    kept = json.loads(json.dumps(first["models"][0]))
    assert {k: v for k, v in saved[0].items() if k != "date"} == kept  # the other model's entry, untouched
    assert saved[1]["seconds"] != first["models"][1]["seconds"]  # this one was measured again
    assert "stdlib-lm-skip" in json.loads(out.read_text())["meta"]["date"]
