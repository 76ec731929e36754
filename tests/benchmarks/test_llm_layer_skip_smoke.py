"""``benchmarks/llm_layer_skip.py --smoke`` runs every config end to end in seconds, so the script cannot rot."""

from __future__ import annotations

import json


def test_smoke_run_covers_every_config(load_bench, tmp_path, capsys):
    bench = load_bench("llm_layer_skip")
    out = tmp_path / "smoke.json"
    res = bench.main(["--smoke", "--out", str(out)])
    rows = {r["config"]: r for r in res["rows"]}
    assert list(rows) == list(bench.configs(8))
    assert res["meta"]["model"] == bench.SMOKE_MODEL and res["meta"]["new_tokens"] == 6
    base, zero = rows["baseline"], rows["zero-skip config"]
    assert base["speedup"] == 1.0 and base["bound"] == 1.0 and base["decode_agreement"] == 1.0
    # a schedule that skips nothing spends every FLOP and reproduces the baseline's tokens
    assert zero["flops_fraction"] == 1.0 and zero["decode_agreement"] == zero["free_running_agreement"] == 1.0
    # more speedup asked of Unified Layer Skipping, fewer decode FLOPs spent
    assert 1.0 < rows["unified s=1.5"]["bound"] < rows["unified s=2"]["bound"] < rows["unified s=3"]["bound"]
    assert rows["ffn-skip 25% (forced)"]["flops_fraction"] < 1.0
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(res["rows"]))
    assert "| 1 | unified s=2 |" in capsys.readouterr().out

