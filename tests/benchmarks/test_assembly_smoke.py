"""``benchmarks/assembly.py --smoke`` runs every method's code path on tiny models (so it cannot rot)."""

from __future__ import annotations

import json
import math

import pytest


@pytest.mark.slow
def test_assembly_benchmark_smoke(tmp_path, load_bench, threads):
    for name in ("_diffusion_models", "_diffusion_methods", "diffusion"):
        load_bench(name)
    assembly = load_bench("assembly")
    out = tmp_path / "asm.json"
    assert assembly.main(["--smoke", "--out", str(out), "--threads", str(threads)]) == 0
    res = json.loads(out.read_text())["models"]["digits-sd"]
    rows = {r["method"]: r for r in res["rows"]}
    assert not [m for m, r in rows.items() if "error" in r]
    assert res["networks"]["assembled"]["flops_per_step"] < 1 and res["networks"]["condconv"]["parameters"] > 0
    # the assembled UNet without distillation is exactly the BK-SDM-style removal in smoke mode (no training)
    assert rows["assembled (distilled)"]["psnr"] == rows["BK-SDM-style removal, not distilled"]["psnr"]
    assert all(math.isfinite(r["psnr"]) for r in rows.values() if r["family"] != "baseline")
    assert (tmp_path / "asm_pareto.png").is_file()
