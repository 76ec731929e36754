"""``benchmarks/assembly.py --smoke`` runs every method's code path on tiny models (so it cannot rot)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
def test_assembly_benchmark_smoke(tmp_path, monkeypatch):
    mods = {}
    for name in ("diffusion_models", "diffusion_methods", "diffusion", "assembly"):
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        mods[name] = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, mods[name])
        spec.loader.exec_module(mods[name])
    out = tmp_path / "asm.json"
    threads = torch.get_num_threads()
    try:
        assert mods["assembly"].main(["--smoke", "--out", str(out), "--threads", str(threads)]) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text())["models"]["digits-sd"]
    rows = {r["method"]: r for r in res["rows"]}
    assert not [m for m, r in rows.items() if "error" in r]
    assert res["networks"]["assembled"]["flops_per_step"] < 1 and res["networks"]["condconv"]["parameters"] > 0
    # the assembled UNet without distillation is exactly the BK-SDM-style removal in smoke mode (no training)
    assert rows["assembled (distilled)"]["psnr"] == rows["BK-SDM-style removal, not distilled"]["psnr"]
    assert all(math.isfinite(r["psnr"]) for r in rows.values() if r["family"] != "baseline")
    assert (tmp_path / "asm_pareto.png").is_file()
