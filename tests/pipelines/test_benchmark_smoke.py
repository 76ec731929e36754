"""``benchmarks/diffusion.py --smoke`` runs every method's code path on tiny pipelines (so it cannot rot)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "diffusion.py"


@pytest.mark.slow
def test_diffusion_benchmark_smoke(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_diffusion", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_diffusion", bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    out = tmp_path / "smoke.json"
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--smoke", "--out", str(out), "--threads", str(threads)]) == 0
    finally:
        torch.set_num_threads(threads)
    results = json.loads(out.read_text())
    assert set(results["models"]) == {"digits-dit", "digits-sd"}
    for name, res in results["models"].items():
        rows = [r for r in res["rows"] if r["family"] in ("mmskip", "baseline", "fewer-steps")]
        assert len(rows) >= 10, name
        for r in rows:
            assert "error" not in r, (name, r["method"], r.get("error"))
            assert r["family"] == "baseline" or math.isfinite(r["psnr"]), (name, r["method"])
    assert (tmp_path / "diffusion_gaussian_digits-sd_smoke.safetensors").is_file()
    assert (tmp_path / "smoke.md").is_file()
