"""``benchmarks/diffusion_gpu.py --smoke`` runs every model and method code path on CPU (so it cannot rot)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

HAS_CACHE_DIT = importlib.util.find_spec("cache_dit") is not None
FAMILIES = {"baseline", "mmskip", "diffusers-fbc", "diffusers-magcache", "diffusers-taylorseer", "cache-dit",
            "baseline-again"}


@pytest.mark.slow
def test_diffusion_gpu_smoke(tmp_path, load_bench, threads):
    bench = load_bench("diffusion_gpu", "bench_diffusion_gpu")
    out = tmp_path / "s.json"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["models"]) == {"sd15", "flux", "wan"} and res["meta"]["smoke"]
    assert "| flux | mmskip FI every 2 | on |" in out.with_suffix(".md").read_text()
    for name in ("sd15", "flux", "wan"):
        rows = [r for r in res["rows"] if r["model"] == name]
        assert {r["family"] for r in rows} == FAMILIES, name
        for r in rows:
            if r["family"] in ("baseline", "mmskip", "baseline-again"):
                assert "error" not in r and "skipped" not in r, (name, r["method"], r.get("error"))
            if name == "sd15" and r["family"] not in ("baseline", "mmskip", "baseline-again"):
                assert "skipped" in r, (name, r["method"])  # the caches need transformer blocks
            elif r["family"] == "cache-dit" and not HAS_CACHE_DIT:  # the `bench` extra, not `dev`
                assert "not installed" in r["skipped"], (name, r["method"])
            elif name != "sd15":  # the diffusers caches and cache-dit run on the transformers
                assert "error" not in r and "skipped" not in r, (name, r["method"], r.get("error"))
            if "s_per_traj" in r:
                assert math.isfinite(r["rel_l2"]) and not math.isnan(r["psnr"]), (name, r["method"])
                assert r["bound"] >= 1.0 - 1e-6 and r["speedup"] > 0, (name, r["method"])
        # methods leave the model as they found it; compile rows (flux, wan) use the eager baseline's bound
        assert all(r["psnr"] == math.inf for r in rows if r["family"] == "baseline-again")
        inherit = [r for r in rows if r["method"] == "mmskip FI every 3"]
        assert all(r["bound"] > 1.2 and 0 < r["mmskip_stats"]["inherited_steps"] for r in inherit), inherit
        assert {r["compile"] for r in rows} == ({False} if name == "sd15" else {False, True})
    assert len(res["models"]["flux"]["mag_ratios"]) == 3  # MagCache calibrated on the model itself


def test_diffusion_gpu_without_cuda_measures_nothing(tmp_path, monkeypatch, capsys, load_bench):
    bench = load_bench("diffusion_gpu", "bench_diffusion_gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu.json"
    assert bench.main(["--out", str(out)]) == 0
    assert not out.exists() and not out.with_suffix(".md").exists()
    assert "no CUDA device" in capsys.readouterr().out
