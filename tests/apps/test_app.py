"""The app's work functions (what each tab runs), its Gradio wiring (each tab called the way Gradio
calls it, progress tracker included) and ``mmskip app``'s errors, without a browser."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[2] / "apps" / "app.py"
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="module")
def app():
    spec = importlib.util.spec_from_file_location("mmskip_app_functions", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def blocks(app):
    pytest.importorskip("gradio")
    return app.build_app()


def _component(blocks, elem_id: str):
    return next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == elem_id)


def _handler(blocks, name: str):
    return next(fn for fn in blocks.fns.values() if fn.name == name)


@pytest.fixture()
def progress_log(monkeypatch):
    """What the tabs tell Gradio's progress bar while Gradio runs them (descriptions, in order)."""
    import gradio.helpers

    seen: list[str] = []
    monkeypatch.setattr(gradio.helpers.Progress, "_progress_callback",
                        staticmethod(lambda: lambda tracked: seen.append(tracked[-1].desc)))
    return seen


def _gradio_call(blocks, name: str, inputs: list):
    """Run a tab's handler exactly as Gradio does (special args such as the progress tracker inserted)."""
    return asyncio.run(blocks.call_function(_handler(blocks, name), list(inputs)))["prediction"]


TEXT = Path(json.__file__).read_text()[:1500]


@pytest.mark.parametrize("name, inputs, stage, expect", [
    ("run_language", ["stdlib-lm", "def read(path):\n", "Unified Layer Skipping s=2", 8, 3], "generating 8 tokens",
     "tokens/s"),
    ("run_diffusion", ["digits-dit", 4, "feature inheritance, every k-th step", 6, 2, 3, "block", 0.3, 3, 1, 3],
     "warm-up", "PSNR to baseline"),
    ("run_vision", [0, 0.25, "attention", 3], "prefill of 36 questions", "prefill FLOPs fraction"),
    ("run_video", [8, 0.2, 3], "streaming 9 videos", "KV cache per frame"),  # 8: the last two-clip video
    ("run_mue", [23, 0.9, 3], "answering 24 tasks", "decoder layer-tokens run"),
    ("run_analysis", ["stdlib-lm", TEXT], "analysing every layer", "median relative layer contribution"),
    ("run_tune", ["stdlib-lm", "agreement=0", "2", 1, 3], "tuning stdlib-lm", "trials;"),
])
def test_every_tab_runs_as_gradio_calls_it_and_reports_progress(blocks, progress_log, name, inputs, stage, expect):
    """Regression: Gradio passed ``progress`` twice to the Analysis tab (it failed for every input)
    and the wrapper hid the tracker from ``@torch.no_grad()`` functions (no stage messages)."""
    out = _gradio_call(blocks, name, inputs)
    assert expect in out[-1]
    assert any(d and d.startswith(stage) for d in progress_log), progress_log
    assert progress_log[0].startswith("loading")


def test_language_tab_reports_paired_speed_and_a_lossless_badge(app):
    plain, fast, md = app.run_language("stdlib-lm", "def read(path):\n", "SWIFT (lossless)", 8)
    assert plain == fast and "identical output" in md and "tokens/s" in md
    assert "3 pairs" in md and "median of 3 interleaved pairs" in md


def test_language_tab_swift_with_prompt_lookup_is_lossless(app):
    assert app.lm_config("SWIFT + prompt lookup (lossless)").prompt_lookup == (2, 4)
    assert app.lm_config("SWIFT (lossless)").prompt_lookup is None
    plain, fast, md = app.run_language("stdlib-lm", "def read(path):\n    path = path\n", "SWIFT + prompt lookup (lossless)", 8)
    assert plain == fast and "identical output" in md


def test_diffusion_tab_gives_three_images_and_a_paired_table(app):
    base, fast, fewer, md = app.run_diffusion("digits-dit", 4, app.DIFF_TECHNIQUES[2], steps=6, teleport=0.5, seed=1)
    assert base.size == fast.size == fewer.size == (256, 256)
    header, _, seconds, speed, bound, psnr = md.split("\n")[:6]
    assert "Gaussian teleport: first 50% of the steps analytic" in header and "fewer steps, same time (" in header
    assert speed.split("|")[3].strip().endswith("3 pairs)") and "FLOPs fraction 0.50" in bound.split("|")[3]


class FakeClock:
    """``paired`` without a clock: every function runs once and each candidate reports ``ratio``."""

    def __init__(self) -> None:
        self.ratio = 2.0
        self.calls: list[list[str]] = []  # the candidates' names, per timing

    def paired(self, baseline, candidates, repeats, warmup, progress=None):
        from mmskip.timing import Timing

        baseline()
        for fn in candidates.values():
            fn()
        self.calls.append(list(candidates))
        return {n: Timing((1.0,) * repeats, (1.0 / self.ratio,) * repeats) for n in candidates}


@pytest.fixture()
def fake_timing(app, monkeypatch):
    import app_core

    clock = FakeClock()
    monkeypatch.setattr(app_core, "paired", clock.paired)
    return clock


def test_the_fewer_steps_image_is_timed_against_the_same_baseline(app, fake_timing):
    """Regression: only the technique was timed (once); "fewer steps, same time" inherited its noise."""
    _, _, _, md = app.run_diffusion("digits-dit", 4, app.DIFF_TECHNIQUES[0], steps=8, every=2)
    assert fake_timing.calls == [["feature inheritance: recompute 1 step in 2 (block granularity)"], ["fewer"]]
    header, _, seconds, speed = md.split("\n")[:4]
    assert "fewer steps, same time (4 steps)" in header  # 8 steps / 2.00x
    assert speed.count("**2.00×** (2.00–2.00, 3 pairs)") == 2 and "At about the same time, plain 4 steps" in md


def test_a_technique_slower_than_the_baseline_is_compared_with_the_full_run(app, fake_timing):
    fake_timing.ratio = 0.5
    _, _, _, md = app.run_diffusion("digits-dit", 4, app.DIFF_TECHNIQUES[0], steps=8, every=2)
    assert len(fake_timing.calls) == 1 and "fewer steps, same time (8 steps)" in md and "1.00× (the baseline)" in md
    assert "**The technique is not faster than the baseline here** (0.50×)" in md


@pytest.mark.parametrize("technique, knobs, label", [
    (0, dict(every=4, granularity="layer"), "feature inheritance: recompute 1 step in 4 (layer granularity)"),
    (1, dict(computed=7), "feature inheritance: 7 of 20 steps recomputed, non-uniform (block granularity)"),
    (2, dict(teleport=0.25), "Gaussian teleport: first 25% of the steps analytic"),
    (3, dict(fewer=5), "fewer steps: 5 of 20"),
])
def test_each_diffusion_technique_has_its_own_knob_and_says_what_ran(app, technique, knobs, label):
    """Regression: one slider "k" meant three things; the table did not say which setting ran."""
    name = app.DIFF_TECHNIQUES[technique]
    ran, steps, _ = app.diffusion_setup(name, 20, **knobs)
    assert ran == label and steps == (5 if technique == 3 else 20)
    shown = app.controls_for(name)
    own = {0: "every", 1: "computed", 2: "teleport", 3: "fewer"}[technique]
    assert shown[own] and sum(shown.values()) == (2 if technique < 2 else 1)  # inheritance adds granularity


def test_choosing_a_technique_shows_only_its_knobs(blocks):
    updates = _gradio_call(blocks, "<lambda>", ["fewer steps"])
    assert [u["visible"] for u in updates] == [False, False, False, False, True]
    for elem, visible in (("d-every", True), ("d-computed", False), ("d-teleport", False), ("d-fewer", False)):
        assert _component(blocks, elem).visible is visible  # the default technique's knob only


def test_language_tabs_offer_only_causal_language_models(app, blocks, tmp_path):
    """Regression: the Language tab's model list (and its error) offered diffusion models."""
    assert app.language_models() == ["stdlib-lm", "stdlib-lm-skip"]
    assert _component(blocks, "lm-model").choices == _component(blocks, "a-model").choices == [
        (n, n) for n in app.language_models()]
    with pytest.raises(app.AppError, match="not a causal language model"):
        app.check_language_model("digits-dit")
    with pytest.raises(app.AppError, match="neither a zoo language model") as e:
        app.check_language_model("no-such-model")
    assert "digits" not in str(e.value)
    with pytest.raises(app.AppError, match="not a transformers causal language model"):
        app.check_language_model(str(app.pipeline_folder("digits-dit")[0]))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    assert app.check_language_model(f" {tmp_path} ") == str(tmp_path)


@pytest.mark.parametrize("field", ["", "   ", None])
def test_an_empty_pipeline_field_says_so(app, field):
    """Regression: an empty field read as the server's working directory ("no model_index.json in .")."""
    with pytest.raises(app.AppError, match="the pipeline field is empty: choose a zoo pipeline") as e:
        app.run_diffusion(field, 1, "fewer steps", steps=4, fewer=2)
    assert "in directory ." not in str(e.value)


def test_video_slider_reaches_every_two_clip_video_and_shows_every_clip(app, blocks):
    """Regression: the slider stopped before the last video, and the picture showed the first clip only."""
    import torch
    from app_vision import _video

    assert _component(blocks, "vv-example").maximum == len(_video()[3]) - 1 == app.VIDEO_EXAMPLES - 1
    strip = app.video_strip(torch.rand(2, 4, 32, 32), 2)
    assert strip.shape == (2 * 32 + 2, 4 * 32)  # two rows of four frames, a blank line between
    assert _component(blocks, "vv-image").label.startswith("the video: one row of frames per clip")


def test_slider_ranges_match_the_held_out_sets(app, blocks):
    from app_vision import _florence, _llava

    assert len(_llava()[2].questions) == app.VISION_EXAMPLES and len(_florence()[2]) == app.MUE_EXAMPLES


def test_a_speedup_beyond_its_flops_bound_is_flagged_visibly(app, fake_timing):
    fake_timing.ratio = 10.0
    _, _, md = app.run_language("stdlib-lm", "def read(path):\n", "Unified Layer Skipping s=2", 4)
    assert "⚠️" in md and "exceeds the FLOPs bound" in md and "**10.00×** (10.00–10.00, 3 pairs)" in md
    _, _, _, md = app.run_diffusion("digits-dit", 4, app.DIFF_TECHNIQUES[0], steps=8, every=2)
    assert "⚠️ **feature inheritance: recompute 1 step in 2 (block granularity)**: measured 10.00x" in md


def test_user_errors_log_one_line_and_bugs_a_traceback(app, caplog):
    """Regression: every bad input logged a full traceback on the server."""
    import gradio as gr

    caplog.set_level(logging.INFO, logger="mmskip.app")
    bad_input = app.handler(app.run_diffusion, 11)
    with pytest.raises(gr.Error) as e:
        bad_input("digits-dit", 1, app.DIFF_TECHNIQUES[0], 4, 2, 3, "atoms", 0.3, 2, 0, 3, None)
    assert "granularity" in e.value.message and e.value.print_exception is False
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and record.exc_info is None and "granularity" in record.getMessage()

    caplog.clear()

    def broken(progress=None):
        raise KeyError("internal")

    with pytest.raises(gr.Error, match="internal error in broken") as e:
        app.handler(broken, 0)(None)
    (record,) = caplog.records
    assert record.levelno == logging.ERROR and record.exc_info is not None and e.value.print_exception is False


@pytest.mark.parametrize("call, match", [
    (lambda a: a.run_mue(0, 0.0), "threshold"),
    (lambda a: a.run_video(0, 1.5), "keep ratio"),
    (lambda a: a.run_vision(0, 0.0), "keep ratio"),
    (lambda a: a.run_diffusion("digits-dit", 1, a.DIFF_TECHNIQUES[0], steps=4, granularity="atoms"), "granularity"),
    (lambda a: a.run_diffusion("digits-dit", 1, a.DIFF_TECHNIQUES[2], steps=4, teleport=1.0), "skip_fraction"),
    (lambda a: a.run_diffusion("digits-dit", 1, a.DIFF_TECHNIQUES[1], steps=4, computed=9), "num_compute"),
    (lambda a: a.run_diffusion("digits-dit", 1, "fewer steps", steps=4, fewer=4), "fewer steps must lie in 1..3"),
    (lambda a: a.run_diffusion("digits-dit", 1, "fewer steps", steps=4, seed=None), "seed field is empty"),
    (lambda a: a.run_diffusion("digits-dit", 1, "fewer steps", steps=4, fewer=2, pairs=2), "at least 3"),
    (lambda a: a.run_vision(999, 0.5), "example must lie"),
    (lambda a: a.run_language("stdlib-lm", "   ", "FFN-SkipLLM"), "prompt is empty"),
    (lambda a: a.run_language("", "x = 1", "FFN-SkipLLM"), "model field is empty"),
    (lambda a: a.run_language("no-such-model", "x = 1", "FFN-SkipLLM"), "neither a zoo language model"),
    (lambda a: a.lm_config("turbo"), "unknown technique"),
    (lambda a: a.run_diffusion("no/such/folder", 1, "fewer steps"), "neither a zoo pipeline"),
    (lambda a: a.run_diffusion("digits-llava", 1, "fewer steps"), "not a pipeline this tab runs"),
    (lambda a: a.run_diffusion("digits-dit", 1, "fewer steps", steps=1), "steps must be"),
    (lambda a: a.run_analysis("stdlib-lm", "x"), "paste some code"),
    (lambda a: a.run_analysis("stdlib-lm", "x = 1\n" * 12), "needs at least 64 tokens"),
])
def test_bad_input_is_a_message_not_a_traceback(app, call, match):
    with pytest.raises(app.AppError, match=match):
        call(app)


def test_help_is_whole_and_every_option_says_what_it_does(app, capsys):
    """Regression: ``mmskip app --help`` stopped mid-sentence and --port had no help."""
    with pytest.raises(SystemExit) as e:
        app.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    assert "see speed and quality side by side" in out and "pip install 'mmskip[app]'" in out
    for option, words in (("--host", "address to bind"), ("--port", "port to serve on"), ("--share", "gradio.live")):
        assert f"{option} " in out and words in out.split(option, 2)[-1]


def test_a_port_in_use_is_one_clear_error(app, capsys):
    pytest.importorskip("gradio")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert app.main(["--port", str(s.getsockname()[1])]) == 2
    assert "pick another --port" in capsys.readouterr().err


def test_app_help_imports_no_torch_and_the_tabs_load_on_first_use():
    """``mmskip app --help`` only parses arguments; the tabs' modules (torch, gradio) load when used."""
    probe = ("import importlib.util, sys\n"
             f"spec = importlib.util.spec_from_file_location('app', {str(APP)!r})\n"
             "app = importlib.util.module_from_spec(spec); spec.loader.exec_module(app)\n"
             "try:\n    app.main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print('torch' in sys.modules, 'gradio' in sys.modules)\n"
             "print(app.run_language.__module__, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.splitlines()[-2:] == ["False False", "app_language True"], out.stderr
