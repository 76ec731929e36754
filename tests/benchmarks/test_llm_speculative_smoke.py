"""The SWIFT benchmark runs (``--smoke``: a tiny random model, seconds), so it cannot rot."""

from __future__ import annotations

import json


def test_llm_speculative_smoke(load_bench, tmp_path, capsys):
    bench = load_bench("llm_speculative", "bench_llm_speculative")
    out = tmp_path / "smoke.json"
    result = bench.main(["--smoke", "--out", str(out)])
    rows = {r["config"]: r for r in result["rows"]}
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    assert out.with_suffix(".md").read_text().startswith("random-4x64 (4 layers)")
    swift = [name for name in rows if name.startswith("swift")]
    assert swift == ["swift r=0.3", "swift r=0.3 (found set)", "swift r=0.3 (found set) + lookup"]
    lossless = ["plain", *swift, "early-exit k=2", "transformers prompt lookup k=6"]
    for name in lossless:  # lossless configs keep plain's tokens
        assert rows[name]["equal_outputs"] == "2/2" and rows[name]["token_agreement"] == 1.0, name
    for name in swift:
        r = rows[name]
        accepted = round(r["mean_accepted_length"] * r["verify_forwards"])
        assert accepted + r["verify_forwards"] + 2 == 2 * 8  # 2 prompts x 8 tokens: prefill + verified tokens
    looked = rows["swift r=0.3 (found set) + lookup"]
    assert 0 <= looked["lookup_drafted_tokens"] <= looked["drafted_tokens"]
    assert "swift r=0.3" in capsys.readouterr().out
