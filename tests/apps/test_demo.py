"""The demo's speed figures: paired timing (``mmskip.timing.paired``), quartiles and FLOPs bound
beside every speedup, a visible line when a speedup beats its bound; checked with a fake clock
(no timing thresholds)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "apps" / "demo.py"


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("apps_demo_timing", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeClock:
    """``paired`` without a clock: every function runs once and each candidate reports ``ratio``."""

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio
        self.calls: list[tuple[list[str], int, int]] = []  # (candidates, repeats, warmup) per timing

    def paired(self, baseline, candidates, repeats, warmup, progress=None):
        from mmskip.timing import Timing

        baseline()
        for fn in candidates.values():
            fn()
        self.calls.append((list(candidates), repeats, warmup))
        return {n: Timing((1.0, 1.0, 1.0), (1.0 / self.ratio, 0.8 / self.ratio, 1.25 / self.ratio)) for n in candidates}


def test_language_demo_pairs_every_config_with_the_full_model(demo, monkeypatch, capsys):
    """Regression: speedups were a best-of-two of single timings (0.59x to 2.17x on identical runs)."""
    clock = FakeClock(ratio=1.5)
    monkeypatch.setattr(demo, "paired", clock.paired)
    rows = demo.language_demo("stdlib-lm", new_tokens=3, repeats=3)
    (names, repeats, warmup), = clock.calls
    assert names == [r["config"] for r in rows[1:]] and (repeats, warmup) == (3, 1)
    assert rows[0]["speedup"] == 1.0 and rows[0]["pairs"] is None
    for r in rows[1:]:
        assert r["speedup"] == pytest.approx(1.5) and r["pairs"] == 3
        assert r["spread"][0] < 1.5 < r["spread"][1]  # the quartiles of 1.2, 1.5, 1.875
    out = capsys.readouterr().out
    assert "median of 3 interleaved pairs" in out and "quartiles" in out


def test_a_speedup_beyond_its_flops_bound_is_printed(demo, monkeypatch, capsys):
    monkeypatch.setattr(demo, "paired", FakeClock(ratio=10.0).paired)
    rows = demo.language_demo("stdlib-lm", new_tokens=3, repeats=3)
    flagged = [r for r in rows[1:] if r["bound_warning"]]
    assert flagged and all("exceeds the FLOPs bound" in r["bound_warning"] for r in flagged)
    assert "! measured 10.00x" in capsys.readouterr().out


def test_speculative_demo_is_paired_and_lossless(demo, monkeypatch):
    clock = FakeClock(ratio=0.8)
    monkeypatch.setattr(demo, "paired", clock.paired)
    rows = demo.speculative_demo("stdlib-lm", new_tokens=3, repeats=4)
    assert clock.calls == [([r["config"] for r in rows], 4, 1)]
    assert all(r["identical"] == "4/4" and r["speedup"] == pytest.approx(0.8) for r in rows)


def test_diffusion_demo_pairs_every_method_and_prints_bounds(demo, monkeypatch, tmp_path, capsys):
    clock = FakeClock(ratio=2.0)
    monkeypatch.setattr(demo, "paired", clock.paired)
    rows = demo.diffusion_demo("digits-dit", tmp_path, steps=6, repeats=3)
    (names, repeats, warmup), = clock.calls
    assert names == [r["method"] for r in rows[1:]] and (repeats, warmup) == (3, 1)
    by = {r["method"]: r for r in rows}
    assert by["fewer steps: DDIM-2"]["flops_bound"] == pytest.approx(3.0)  # 2 of 6 steps
    assert by["full DDIM-6"]["psnr_db"] >= 99 and (tmp_path / "digits-dit.png").is_file()
    out = capsys.readouterr().out
    assert "bound: the denoiser FLOPs kept" in out and "quartiles" in out


def test_fewer_than_three_repeats_is_one_clear_error(demo, capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--only", "language", "--repeats", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--repeats must be at least 3" in err and "Traceback" not in err
