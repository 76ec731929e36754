"""``benchmarks/llm_compiled.py --smoke`` traces every config with torch.compile(fullgraph=True) in seconds."""

from __future__ import annotations


def test_smoke_compiles_every_config_and_matches_eager(load_bench, capsys):
    bench = load_bench("llm_compiled")
    res = bench.main(["--smoke", "--threads", "1"])
    rows = {r["config"]: r for r in res["rows"]}
    assert list(rows) == list(bench.configs())
    assert res["meta"]["backend"] == "eager" and res["meta"]["mode"] == "default"
    # float32 + dynamo only: the compiled static-cache decode gives the eager tokens exactly
    assert all(r["compiled_equals_eager"] for r in rows.values())
    assert rows["baseline"]["bound"] == 1.0 and rows["baseline"]["decode_agreement"] == 1.0
    assert 1.0 < rows["unified s=1.5"]["bound"] < rows["unified s=2"]["bound"]
    assert "| 1 | unified s=2 |" in capsys.readouterr().out
