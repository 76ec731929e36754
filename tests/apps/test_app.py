"""The app's work functions (what each tab runs) and ``mmskip app``'s errors, without a browser."""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[2] / "apps" / "app.py"


@pytest.fixture(scope="module")
def app():
    spec = importlib.util.spec_from_file_location("mmskip_app_functions", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_language_tab_reports_speed_and_a_lossless_badge(app):
    plain, fast, md = app.run_language("stdlib-lm", "def read(path):\n", "SWIFT (lossless)", 8)
    assert plain == fast and "identical output" in md and "tokens/s" in md
    _, _, md = app.run_language("stdlib-lm", "def read(path):\n", "Unified Layer Skipping s=2", 8)
    assert "FLOPs fraction" in md and "speedup" in md


def test_diffusion_tab_gives_three_images_and_psnr(app):
    base, fast, fewer, md = app.run_diffusion("digits-dit", 4, app.DIFF_TECHNIQUES[0], steps=6, k=2, seed=1)
    assert base.size == fast.size == fewer.size == (256, 256)
    assert "PSNR to baseline" in md and "FLOPs fraction" in md
    _, _, _, md = app.run_diffusion("digits-dit", 4, app.DIFF_TECHNIQUES[2], steps=6, teleport=0.5)
    assert "analytic early steps" in md and "PSNR to baseline" in md


def test_vision_tab_reports_work_and_kv_saved(app):
    _, full = app.run_vision(0, 1.0)
    assert "| prefill FLOPs fraction | 1.00 | 1.00 |" in full
    image, md = app.run_vision(0, 0.25)
    assert image.size == (256, 256)
    frac = float(md.split("| prefill FLOPs fraction | 1.00 | ")[1].split(" |")[0])
    assert 0 < frac < 1 and "KV cache kept" in md


def test_mue_and_video_tabs_report_the_work_they_save(app):
    _, md = app.run_mue(0, 0.9)
    work = float(md.split("| decoder layer-tokens run | 1.00 | ")[1].split(" |")[0])
    assert 0 < work < 1 and "exact match" in md
    _, md = app.run_video(0, 0.2)
    kv = md.split("| KV cache per frame | ")[1].split(" |")
    assert int(kv[1].split()[0]) < int(kv[0].split()[0])  # fewer KiB per frame with VideoLLM-MoD


@pytest.mark.parametrize("call, match", [
    (lambda a: a.run_mue(0, 0.0), "threshold"),
    (lambda a: a.run_video(0, 1.5), "keep ratio"),
    (lambda a: a.run_vision(0, 0.0), "keep ratio"),
    (lambda a: a.run_diffusion("digits-dit", 1, a.DIFF_TECHNIQUES[0], steps=4, granularity="atoms"), "granularity"),
    (lambda a: a.run_diffusion("digits-dit", 1, a.DIFF_TECHNIQUES[2], steps=4, teleport=1.0), "skip_fraction"),
    (lambda a: a.run_vision(999, 0.5), "example must lie"),
    (lambda a: a.run_language("stdlib-lm", "   ", "FFN-SkipLLM"), "prompt is empty"),
    (lambda a: a.run_language("no-such-model", "x = 1", "FFN-SkipLLM"), "neither a zoo name"),
    (lambda a: a.lm_config("turbo"), "unknown technique"),
    (lambda a: a.run_diffusion("no/such/folder", 1, "fewer steps"), "neither a zoo model"),
    (lambda a: a.run_diffusion("digits-dit", 1, "fewer steps", steps=1), "steps must be"),
    (lambda a: a.run_analysis("stdlib-lm", "x"), "paste some code"),
])
def test_bad_input_is_a_message_not_a_traceback(app, call, match):
    with pytest.raises(app.AppError, match=match):
        call(app)


def test_a_port_in_use_is_one_clear_error(app, capsys):
    pytest.importorskip("gradio")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert app.main(["--port", str(s.getsockname()[1])]) == 2
    assert "pick another --port" in capsys.readouterr().err
