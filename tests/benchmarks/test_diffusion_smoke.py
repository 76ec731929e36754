"""``benchmarks/diffusion.py`` and ``diffusion_search.py --smoke`` run every code path (so they cannot rot);
the fewer-steps front arithmetic is checked on hand-made points."""

from __future__ import annotations

import json
import math

import pytest


def test_front_interpolates_in_log_speed(load_bench):
    bench = load_bench("diffusion")
    front = [(1.0, 40.0), (4.0, 20.0)]
    assert bench.front_psnr(front, 2.0) == pytest.approx(30.0)  # halfway in log(speedup)
    assert bench.front_psnr(front, 0.9) is None and bench.front_psnr(front, 5.0) is None
    rows = [
        {"method": "b", "family": "baseline", "speedup": 1.0, "bound": 1.0, "psnr": math.inf},
        {"method": "s10", "family": "fewer-steps", "speedup": 1.0, "bound": 1.0, "psnr": 40.0},
        {"method": "s5", "family": "fewer-steps", "speedup": 4.0, "bound": 4.0, "psnr": 20.0},
        {"method": "m", "family": "mmskip", "speedup": 2.0, "bound": 2.0, "psnr": 33.0},
        {"method": "slow", "family": "mmskip", "speedup": 0.8, "bound": 0.8, "psnr": 50.0},
    ]
    bench.mark_front(rows)
    assert rows[3]["above_front_db"] == pytest.approx(3.0)
    assert rows[3]["above_front_db_at_bound"] == pytest.approx(3.0)
    assert "above_front_db" not in rows[4]  # outside the front's range: no claim either way


def test_specs_parse_and_refuse_bad_tokens(load_bench):
    dm = load_bench("_diffusion_methods")
    assert dm.parse_spec("steps=17 fi=interval:2 targets=deep") == {"steps": "17", "fi": "interval:2", "targets": "deep"}
    with pytest.raises(ValueError, match="bad mmskip spec token"):
        dm.parse_spec("fi=interval:2 every=3")
    search = load_bench("diffusion_search")
    assert search.with_steps("fi=nonuniform:14 targets=deep", 14, 28) == "steps=14 fi=nonuniform:7 targets=deep"


@pytest.mark.slow
def test_diffusion_benchmark_smoke(tmp_path, load_bench, threads):
    bench = load_bench("diffusion")
    out = tmp_path / "smoke.json"
    assert bench.main(["--smoke", "--out", str(out), "--threads", str(threads)]) == 0
    results = json.loads(out.read_text())
    assert set(results["models"]) == {"scenes-flux", "digits-dit", "digits-sd"}
    for name, res in results["models"].items():
        rows = [r for r in res["rows"] if r["family"] in ("mmskip", "baseline", "fewer-steps")]
        assert len(rows) >= 8, name
        for r in rows:
            assert "error" not in r, (name, r["method"], r.get("error"))
            assert r["family"] == "baseline" or math.isfinite(r["psnr"]), (name, r["method"])
    peers = [r for r in results["models"]["scenes-flux"]["rows"] if r["family"].startswith("diffusers")]
    assert peers and all("error" not in r for r in peers)  # FirstBlockCache, TaylorSeer, MagCache run on Flux
    assert (tmp_path / "diffusion_gaussian_digits-sd_smoke.safetensors").is_file()
    assert (tmp_path / "smoke.md").is_file() and (tmp_path / "smoke_pareto.png").is_file()


@pytest.mark.slow
def test_diffusion_search_smoke(tmp_path, load_bench, threads):
    search = load_bench("diffusion_search")
    out = tmp_path / "search.json"
    assert search.main(["--smoke", "--out", str(out), "--threads", str(threads)]) == 0
    res = json.loads(out.read_text())
    assert res["front"] and res["stage1"]
    measured = [r for r in res["stage1"] + res["stage2"] if "psnr" in r]
    assert measured and all(r["bound"] > 0 for r in measured)
    assert out.with_suffix(".png").is_file()
