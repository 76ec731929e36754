"""``benchmarks/gpu_campaign.py --smoke``: every section's rows on CPU, a failing section recorded, the time boxes."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

LLM_TECHNIQUES = {"plain", "unified s=2", "unified s=1.5", "void layers", "FFN-SkipLLM (default)",
                  "FFN-SkipLLM 25% (forced)", "SWIFT r=0.45", "early exit k=L/2", "SWIFT / early exit"}
META = ("device", "torch", "transformers", "diffusers")


def _boom(ctx):
    raise RuntimeError("boom: a section that fails")


@pytest.mark.slow
def test_smoke_rows_files_and_a_failing_section(tmp_path, load_bench, monkeypatch, threads):
    bench = load_bench("gpu_campaign", "bench_gpu_campaign")
    monkeypatch.setitem(bench.SECTIONS, "llm", _boom)  # the first section fails; the ones after it still run
    out = tmp_path / "c.json"
    res = bench.main(["--smoke", "--out", str(out)])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["c.json", "c.md", "c.png", "c_diffusion.json", "c_diffusion.md"]  # at most 8, no part files
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(res["rows"], default=str))
    rows = res["rows"]
    for r in rows:
        assert all(k in r for k in META), r
    llm = [r for r in rows if r["section"] == "llm"]
    assert len(llm) == 1 and "boom" in llm[0]["error"]
    vision = {r["technique"]: r for r in rows if r["section"] == "vision"}
    assert set(vision) == {"plain", "p-MoD (default: progressive, attention)", "VideoLLM-MoD (default: r=0.2)",
                           "MuE (default thresholds)"}
    for name, r in vision.items():
        assert "error" not in r and r["host_sync"] == "not checked (CPU)", (name, r.get("error"))
        if name != "plain":
            assert r["speedup"] > 0 and r["flops_bound"] > 1.0 and r["pairs"] >= 1, name
    assert vision["VideoLLM-MoD (default: r=0.2)"]["tokens"] == 16 + 2 * 4 + 1 + 8  # text, 2 frames, newline, text
    diffusion = [r for r in rows if r["section"] == "diffusion"]
    sync = [r for r in diffusion if "sync check" in r["model"]]
    assert [r["technique"] for r in sync] == ["(build)", "baseline", "mmskip FI every 2"]
    measured = {r["technique"]: r for r in diffusion if r.get("source") == "c_diffusion.json"}
    assert {"baseline", "mmskip FI every 2", "diffusers FirstBlockCache 0.05"} <= set(measured)
    assert measured["mmskip FI every 2"]["flops_bound"] > 1.0 and measured["mmskip FI every 2"]["speedup"] > 0
    attention = {(r["model"].split(" ")[0], r["technique"].removeprefix("attention backend ")): r
                 for r in diffusion if "attention backends" in r["model"]}
    for zoo in ("digits-dit", "scenes-flux"):  # skipping off: the parent's images, at the default backend
        assert attention[zoo, "default"]["skip_off_equals_parent"] is True, attention[zoo, "default"]
        xf = attention[zoo, "xformers (enable_xformers_memory_efficient_attention)"]["skipped"]
        assert xf in ("xformers not installed", "CUDA only")
    assert attention["digits-dit", "(build)"]["dispatches_to_backends"] is False  # AttnProcessor2_0 calls SDPA
    assert "SDPA directly" in attention["digits-dit", "(diffusers' set_attention_backend)"]["skipped"]
    for name in ("native", "_native_math"):  # diffusers' backends that run on CPU, through FluxAttnProcessor
        r = attention["scenes-flux", name]
        assert r["skip_off_equals_parent"] is True and r["skip_on_within_bf16_tol"] is True, r
    assert attention["scenes-flux", "(the others)"]["skipped"].startswith("CUDA only: ")
    for r in rows:  # every row says its zoo-model quality, or why it has none
        assert r["quality"]["figure"] is not None or r["quality"]["note"], r
    mue = vision["MuE (default thresholds)"]["quality"]
    assert mue["zoo_model"] == "digits-florence" and mue["source"] == "benchmarks/results/overhead.json"
    assert measured["mmskip FI every 2"]["quality"]["zoo_model"] == "digits-dit"
    text = out.with_suffix(".md").read_text()
    assert "zoo-model quality" in text and "overhead.json" in text
    assert "## Vision-language" in text and "## Diffusion denoisers" in text and "boom" in text


@pytest.mark.slow
def test_smoke_llm_section(tmp_path, load_bench, threads):
    bench = load_bench("gpu_campaign", "bench_gpu_campaign")
    res = bench.main(["--smoke", "--sections", "llm", "--out", str(tmp_path / "c.json")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "c.md", "c.png"]
    llm = res["rows"]
    assert {r["technique"] for r in llm} == LLM_TECHNIQUES
    assert {(r["batch"], r["mode"]) for r in llm} == {(1, "eager"), (1, "compiled"), (2, "eager")}
    for r in llm:
        assert "error" not in r, (r["technique"], r["mode"], r.get("error"))
        if r["technique"] not in ("plain", "SWIFT / early exit"):
            lo, hi = r["spread"]
            assert r["speedup"] > 0 and lo <= hi and r["iqr"] == pytest.approx(hi - lo)
        if r["mode"] == "eager" and r["technique"] in ("plain", "unified s=2", "void layers"):
            assert r["host_sync"] == "not checked (CPU)"
    unified = [r for r in llm if r["technique"] == "unified s=2"]
    assert all(r["flops_bound"] > 1.0 for r in unified) and len(unified) == 3
    compiled = [r for r in llm if r["mode"] == "compiled" and r["technique"] != "plain"]
    assert compiled and all(r["paired"] and r["pairs"] == 3 for r in compiled)  # paired, warm-up round dropped
    assert all(r["graphs_in_timed_rounds"] == 0 and r["cache"] == "static" for r in compiled)


def test_quality_is_read_from_the_results_files(tmp_path, load_bench):
    load_bench("gpu_campaign", "bench_gpu_campaign")
    from _campaign_quality import SOURCES, annotate, describe

    row = {"technique": "mue", "model": "digits-florence", "default_label": "seed: x",
           "quality": {"answer_agreement": 0.5, "accuracy": 0.25}}
    (tmp_path / "overhead.json").write_text(json.dumps({"rows": [row]}))
    rows = [{"technique": "MuE (default thresholds)", "model": "Florence-2-large-shaped"},
            {"technique": "unified s=2", "model": "Llama"}, {"technique": "plain", "model": "Llama"},
            {"technique": "early exit k=L/2", "model": "Llama"}]
    annotate(rows, tmp_path)
    assert rows[0]["quality"] == {"zoo_model": "digits-florence", "figure": "answer_agreement 0.5, accuracy 0.25",
                                  "config": "seed: x", "source": "benchmarks/results/overhead.json"}
    assert rows[1]["quality"]["figure"] is None and "llm_layer_skip_stdlib-lm.json" in rows[1]["quality"]["note"]
    assert "reference" in rows[2]["quality"]["note"] and "no zoo-model figure" in rows[3]["quality"]["note"]
    # every listed source names a row that the committed results hold (a renamed row shows here)
    for technique, sources in SOURCES.items():
        for s in sources:
            q = describe(technique, s.models[0] if s.models else "m")
            assert q["figure"], (technique, s.file, q)


def test_a_row_is_skipped_when_its_time_is_up_and_an_error_does_not_escape(load_bench):
    load_bench("gpu_campaign", "bench_gpu_campaign")
    from _campaign_rows import Context

    rows: list[dict] = []
    ctx = Context("llm", torch.device("cpu"), torch.float32, time.time() + 5, argparse.Namespace(smoke=True),
                  rows.append, meta={"device": "cpu"})
    ctx.attempt("m", "slow", 1, "eager", lambda: {"speedup": 1.0, "spread": [1.0, 1.0]}, need_s=60)
    ctx.attempt("m", "broken", 1, "eager", lambda: 1 / 0)
    ctx.attempt("m", "fine", 1, "eager", lambda: {"speedup": 2.0, "spread": [1.5, 2.5]})
    assert "out of time" in rows[0]["skipped"] and "speedup" not in rows[0]
    assert rows[1]["error"].startswith("ZeroDivisionError")
    assert rows[2]["speedup"] == 2.0 and rows[2]["device"] == "cpu" and rows[2]["section"] == "llm"


def test_a_section_process_is_killed_at_its_limit(load_bench):
    bench = load_bench("gpu_campaign", "bench_gpu_campaign")
    t0 = time.time()
    err = bench.run_process([sys.executable, "-c", "import time; time.sleep(60)"], limit=1.0)
    assert "killed at its time limit" in err["error"] and time.time() - t0 < 30
    assert "status 3" in bench.run_process([sys.executable, "-c", "raise SystemExit(3)"], limit=30)["error"]
    assert bench.run_process([sys.executable, "-c", "pass"], limit=30) is None


def test_a_child_writes_its_rows_to_the_part_file(tmp_path, load_bench, monkeypatch):
    bench = load_bench("gpu_campaign", "bench_gpu_campaign")
    monkeypatch.setitem(bench.SECTIONS, "vision", lambda ctx: ctx.row("m", "t", 1, "eager", speedup=1.5,
                                                                      spread=[1.0, 2.0]))
    part = tmp_path / "c.vision.part.jsonl"
    bench.main(["--smoke", "--out", str(tmp_path / "c.json"), "--section", "vision", "--part", str(part),
                "--deadline", str(time.time() + 60)])
    rows = bench._read_part(part)
    assert [(r["section"], r["technique"], r["speedup"]) for r in rows] == [("vision", "t", 1.5)]
    assert not part.exists()  # merged rows are not read twice


def test_without_cuda_measures_nothing(tmp_path, load_bench, monkeypatch, capsys):
    bench = load_bench("gpu_campaign", "bench_gpu_campaign")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--out", str(tmp_path / "c.json")]) == {}
    assert not list(tmp_path.iterdir()) and "no CUDA device" in capsys.readouterr().out


def test_llm_plan_runs_the_goals_first_and_every_row_once(load_bench):
    load_bench("gpu_campaign", "bench_gpu_campaign")
    import _campaign_llm

    steps = _campaign_llm.plan([1, 8, 32], smoke=False)
    core = ("plain", "unified s=2", "unified s=1.5")
    assert steps[:3] == [("compiled", 1, c) for c in core]
    assert steps[3:9] == [("eager", 1, c) for c in ("plain", *_campaign_llm.hook_configs())]
    assert steps[9:12] == [("compiled", 8, c) for c in core]
    assert len(steps) == len(set(steps))
    techniques = ("plain", *_campaign_llm.hook_configs())
    for b in (1, 8, 32):
        assert {("compiled", b, c) for c in techniques} | {("eager", b, c) for c in techniques} <= set(steps)
        assert ("speculative", b, "") in steps
    for kind, b, c in steps:  # a compiled technique comes after the compiled plain run it is compared with
        if kind == "compiled" and c != "plain":
            assert steps.index(("compiled", b, "plain")) < steps.index((kind, b, c))
    assert {b for k, b, _ in _campaign_llm.plan([1, 2], smoke=True) if k == "compiled"} == {1}


def test_host_sync_reports_the_first_sync_and_every_site(load_bench, monkeypatch):
    """The CUDA branch with torch.cuda's debug mode faked: an op that syncs raises in "error" mode, warns in "warn"."""
    load_bench("gpu_campaign", "bench_gpu_campaign")
    import warnings

    from _campaign_rows import host_sync

    mode = {"now": 0}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: mode["now"])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda m: mode.__setitem__("now", m))

    def op() -> None:  # what torch does on a synchronizing op under each mode
        if mode["now"] == "error":
            raise RuntimeError("called a synchronizing CUDA operation")
        if mode["now"] == "warn":
            warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=2)

    def syncs_three_times() -> None:
        for _ in range(3):
            op()

    cuda = torch.device("cuda")
    got = host_sync(syncs_three_times, cuda)
    assert got.startswith("synced: called a synchronizing CUDA operation at ")
    assert "test_gpu_campaign_smoke.py" in got and got.endswith(" x3")
    assert host_sync(lambda: None, cuda) == "none" and mode["now"] == 0  # the mode is put back
    assert host_sync(syncs_three_times, torch.device("cpu")) == "not checked (CPU)"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_section_process_dies_with_the_campaign(tmp_path):
    """A campaign killed from outside (SIGKILL, no handler runs) takes its running section with it."""
    import signal
    import subprocess

    bench = Path(__file__).resolve().parents[2] / "benchmarks"
    pidfile = tmp_path / "pid"
    section = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    campaign = (f"import sys; sys.path.insert(0, {str(bench)!r}); import gpu_campaign as g; "
                f"g.run_process([sys.executable, '-c', {section!r}], 120)")
    proc = subprocess.Popen([sys.executable, "-c", campaign])
    deadline = time.time() + 120
    while not (pidfile.exists() and pidfile.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    pid = int(pidfile.read_text())
    try:
        assert _alive(pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 30
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.2)
        assert not _alive(pid)
    finally:  # a failing run leaves no sleeper behind
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
