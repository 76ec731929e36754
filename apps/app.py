"""The Gradio app: try mmskip's techniques on the zoo's models (or local ones) and see speed and
quality side by side, every speedup paired-timed (median and spread) beside its FLOPs bound.

    mmskip app                      # http://127.0.0.1:7860, no share link
    mmskip app --port 8000 --share  # a public gradio.live link, only when asked

Tabs: Language (code completion: plain vs a technique, tokens/s, agreement, identical-output
badge for lossless SWIFT), Diffusion (baseline vs accelerated image from the same seed, speedup,
PSNR, FLOPs fraction, and "fewer steps in the same time"), Vision (p-MoD on ``digits-llava``:
keep-ratio slider, answers, accuracy, prefill FLOPs and KV kept), Video (VideoLLM-MoD streamed on
``digits-video``: KV per frame), MuE (decoder exits on ``digits-florence``), Tune (``mmskip.tune``:
the measured front and the tuned output beside the baseline's), Analysis (the depth report's plots). The work behind each tab lives in ``app_language.py``, ``app_diffusion.py`` and
``app_vision.py`` beside this file; ``app_core.py`` holds what they share.
Needs the ``app`` extra (``pip install 'mmskip[app]'``).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # apps/ is no package: the tabs' modules sit beside this file
    sys.path.insert(0, _HERE)

# the tabs' names, imported on first use (torch, transformers, gradio) so that `mmskip app --help` is quick
_EXPORTS = {
    "app_core": ("AppError", "DEFAULT_PAIRS"),
    "app_diffusion": ("DIFF_TECHNIQUES", "DIFFUSION_MODELS", "GRANULARITIES", "controls_for", "diffusion_setup",
                      "pipeline_folder", "run_diffusion"),
    "app_language": ("LM_TECHNIQUES", "check_language_model", "language_models", "lm_config", "run_analysis",
                     "run_language"),
    "app_tune": ("TUNE_MODELS", "run_tune"),
    "app_vision": ("MUE_EXAMPLES", "VIDEO_EXAMPLES", "VISION_EXAMPLES", "run_mue", "run_video", "run_vision",
                   "video_strip"),
}
__all__ = ["build_app", "handler", "main", "user_errors", *(n for names in _EXPORTS.values() for n in names)]

log = logging.getLogger("mmskip.app")


def __getattr__(name: str) -> Any:
    for module, names in _EXPORTS.items():
        if name in names:
            return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def user_errors() -> tuple[type[BaseException], ...]:
    """What a user's input can cause: shown as a message and logged as one line; anything else is a bug."""
    from app_core import AppError

    import mmskip
    from mmskip.zoo import UnknownModelError

    return (AppError, FileNotFoundError, NotADirectoryError, UnknownModelError, mmskip.UnsupportedModelError,
            mmskip.ConcurrentUseError)


# -- the app -------------------------------------------------------------------------------------

def handler(fn: Callable[..., Any], n_inputs: int) -> Callable[..., Any]:
    """``fn`` as a Gradio event handler for ``n_inputs`` input components.

    The handler's signature is the inputs plus ``progress=gr.Progress()``, which is how Gradio
    knows to pass its progress tracker; the tracker reaches ``fn`` as its ``progress`` keyword
    (every tab's function takes one). A user error (:func:`user_errors`) becomes a ``gr.Error``
    message and one log line; anything else is a bug: a ``gr.Error`` that says so, and the full
    traceback in the server log."""
    import gradio as gr

    expected = user_errors()
    if "progress" not in inspect.signature(fn).parameters:
        raise TypeError(f"{fn.__name__} takes no progress keyword; every tab's function reports its stages")

    def call(*args: Any) -> Any:
        *values, progress = args
        try:
            return fn(*values, progress=progress)
        except expected as e:
            log.warning("%s: %s: %s", fn.__name__, type(e).__name__, e)
            raise gr.Error(str(e), print_exception=False) from e
        except gr.Error:
            raise
        except Exception as e:
            log.exception("%s failed (a bug, not bad input)", fn.__name__)
            raise gr.Error(f"internal error in {fn.__name__} ({type(e).__name__}: {e}); the server log has the "
                           "traceback", print_exception=False) from e

    params = [inspect.Parameter(f"input{i}", inspect.Parameter.POSITIONAL_ONLY) for i in range(n_inputs)]
    params.append(inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress()))
    call.__signature__ = inspect.Signature(params)  # what Gradio reads (no __wrapped__: fn's own signature differs)
    call.__name__ = call.__qualname__ = fn.__name__
    call.__doc__ = fn.__doc__
    return call


def build_app() -> Any:
    """The Blocks app: a shared "timing pairs" control and one tab per technique family."""
    import gradio as gr
    from app_core import DEFAULT_PAIRS
    from app_diffusion import DIFF_TECHNIQUES, DIFFUSION_MODELS, GRANULARITIES, controls_for, run_diffusion
    from app_language import LM_TECHNIQUES, language_models, run_analysis, run_language
    from app_tune import TUNE_MODELS, run_tune
    from app_vision import MUE_EXAMPLES, VIDEO_EXAMPLES, VISION_EXAMPLES, run_mue, run_video, run_vision

    def bind(button: Any, fn: Callable[..., Any], inputs: list[Any], outputs: list[Any]) -> None:
        # one run at a time across all tabs: runs share cached models, and two at once spoil each other's timing
        button.click(handler(fn, len(inputs)), inputs, outputs, concurrency_limit=1, concurrency_id="mmskip-run")

    example = "import os\n\n\ndef read_lines(path):"  # no trailing newline: see _PROMPTS in apps/demo.py
    lms = language_models()
    with gr.Blocks(title="mmskip") as app:
        gr.Markdown("# mmskip — skip what does not matter\nEvery number below is measured in this run, on this "
                    "machine; speedups are medians of interleaved pairs against the unmodified model.")
        pairs = gr.Slider(3, 21, value=DEFAULT_PAIRS, step=1, elem_id="pairs",
                          label="timing pairs (each: one unmodified and one accelerated run, after a warm-up; "
                                "more pairs give steadier numbers and take longer)")
        with gr.Tab("Language", elem_id="tab-language"):
            with gr.Row():
                lm_model = gr.Dropdown(lms, value="stdlib-lm-skip" if "stdlib-lm-skip" in lms else lms[0],
                                       allow_custom_value=True, elem_id="lm-model",
                                       label="causal language model (zoo name or local folder)")
                lm_tech = gr.Dropdown(LM_TECHNIQUES, value=LM_TECHNIQUES[0], label="technique", elem_id="lm-tech")
                lm_tokens = gr.Slider(8, 128, value=48, step=8, label="new tokens", elem_id="lm-tokens")
            lm_prompt = gr.Textbox(example, lines=4, label="prompt", elem_id="lm-prompt")
            lm_go = gr.Button("Complete", variant="primary", elem_id="lm-go")
            with gr.Row():
                lm_plain = gr.Textbox(label="plain", lines=6, elem_id="lm-plain")
                lm_fast = gr.Textbox(label="with the technique", lines=6, elem_id="lm-fast")
            lm_stats = gr.Markdown(elem_id="lm-stats")
            bind(lm_go, run_language, [lm_model, lm_prompt, lm_tech, lm_tokens, pairs], [lm_plain, lm_fast, lm_stats])
        with gr.Tab("Diffusion", elem_id="tab-diffusion"):
            with gr.Row():
                d_model = gr.Dropdown(DIFFUSION_MODELS, value="digits-dit", allow_custom_value=True, elem_id="d-model",
                                      label="pipeline (zoo name or local diffusers folder)")
                d_digit = gr.Slider(0, 9, value=3, step=1, label="digit (class / prompt)")
                d_tech = gr.Dropdown(DIFF_TECHNIQUES, value=DIFF_TECHNIQUES[0], label="technique", elem_id="d-tech")
            with gr.Row():
                d_steps = gr.Slider(4, 100, value=30, step=1, label="sampler steps (baseline)", elem_id="d-steps")
                d_seed = gr.Number(0, precision=0, label="seed")
            shown = controls_for(DIFF_TECHNIQUES[0])
            with gr.Row():
                d_every = gr.Slider(1, 10, value=3, step=1, visible=shown["every"], elem_id="d-every",
                                    label="inheritance: recompute 1 step in k (the others inherit features)")
                d_computed = gr.Slider(2, 100, value=10, step=1, visible=shown["computed"], elem_id="d-computed",
                                       label="non-uniform inheritance: steps recomputed (of the sampler steps)")
                d_gran = gr.Dropdown(GRANULARITIES, value="block", visible=shown["granularity"],
                                     label="inheritance granularity")
                d_tele = gr.Slider(0.0, 0.9, value=0.3, step=0.05, visible=shown["teleport"], elem_id="d-teleport",
                                   label="Gaussian teleport: fraction of early steps replaced analytically")
                d_fewer = gr.Slider(1, 99, value=10, step=1, visible=shown["fewer"], elem_id="d-fewer",
                                    label="fewer steps: steps the sampler runs")
            knobs = [d_every, d_computed, d_gran, d_tele, d_fewer]
            d_tech.change(lambda t: [gr.update(visible=v) for v in controls_for(t).values()], d_tech, knobs)
            d_go = gr.Button("Generate", variant="primary", elem_id="d-go")
            with gr.Row():
                d_base = gr.Image(label="baseline", type="pil", elem_id="d-base")
                d_fast = gr.Image(label="accelerated", type="pil", elem_id="d-fast")
                d_fewer_img = gr.Image(label="fewer steps, same time", type="pil", elem_id="d-fewer-img")
            d_stats = gr.Markdown(elem_id="d-stats")
            bind(d_go, run_diffusion, [d_model, d_digit, d_tech, d_steps, *knobs, d_seed, pairs],
                 [d_base, d_fast, d_fewer_img, d_stats])
        with gr.Tab("Vision", elem_id="tab-vision"):
            gr.Markdown("p-MoD on `digits-llava`: vision tokens skip decoder layers; 4×4 grids of digits with "
                        "questions about a position, a count or a sum.")
            with gr.Row():
                v_example = gr.Slider(0, VISION_EXAMPLES - 1, value=0, step=1, label="held-out example")
                v_keep = gr.Slider(0.05, 1.0, value=0.3, step=0.05, label="vision tokens kept per layer")
                v_signal = gr.Dropdown(["attention", "norm"], value="attention", label="which tokens (signal)")
            v_go = gr.Button("Answer", variant="primary", elem_id="v-go")
            with gr.Row():
                v_image = gr.Image(label="grid", type="pil", elem_id="v-image")
                v_stats = gr.Markdown(elem_id="v-stats")
            bind(v_go, run_vision, [v_example, v_keep, v_signal, pairs], [v_image, v_stats])
        with gr.Tab("Video", elem_id="tab-video"):
            gr.Markdown("VideoLLM-MoD on `digits-video`: each frame keeps its top vision tokens per layer; "
                        "clips stream into one cache, then the question is asked.")
            with gr.Row():
                vv_example = gr.Slider(0, VIDEO_EXAMPLES - 1, value=0, step=1, label="held-out two-clip video",
                                       elem_id="vv-example")
                vv_keep = gr.Slider(0.05, 1.0, value=0.2, step=0.05, label="vision tokens kept per frame and layer")
            vv_go = gr.Button("Stream and ask", variant="primary", elem_id="vv-go")
            vv_image = gr.Image(label="the video: one row of frames per clip", type="pil", elem_id="vv-image")
            vv_stats = gr.Markdown(elem_id="vv-stats")
            bind(vv_go, run_video, [vv_example, vv_keep, pairs], [vv_image, vv_stats])
        with gr.Tab("MuE", elem_id="tab-mue"):
            gr.Markdown("MuE on `digits-florence`: decoder tokens exit early once successive layers agree.")
            with gr.Row():
                m_example = gr.Slider(0, MUE_EXAMPLES - 1, value=0, step=1, label="held-out task")
                m_threshold = gr.Slider(0.5, 1.0, value=0.9, step=0.01, label="decoder exit threshold (cosine)")
            m_go = gr.Button("Caption / answer", variant="primary", elem_id="m-go")
            m_image = gr.Image(label="strip", type="pil", elem_id="m-image")
            m_stats = gr.Markdown(elem_id="m-stats")
            bind(m_go, run_mue, [m_example, m_threshold, pairs], [m_image, m_stats])
        with gr.Tab("Tune", elem_id="tab-tune"):
            gr.Markdown("`mmskip.tune`: the fastest setting that keeps a quality floor, searched over every "
                        "technique's declared fields (and a pipeline's steps and sampler) on calibration inputs, "
                        "then confirmed on held-out inputs with paired timing. Clicking again continues the search.")
            with gr.Row():
                t_model = gr.Dropdown(TUNE_MODELS, value="digits-dit", allow_custom_value=True, elem_id="t-model",
                                      label="model (zoo name or local folder)")
                t_floor = gr.Textbox("", label="floor (METRIC=NUMBER, e.g. psnr=30 or agreement=0.9; empty: the "
                                     "model's default)", elem_id="t-floor")
                t_budget = gr.Textbox("60s", label="budget: trials (12) or search time (60s, 5m)", elem_id="t-budget")
                t_inputs = gr.Slider(1, 16, value=4, step=1, label="calibration inputs (as many held out)",
                                     elem_id="t-inputs")
            t_go = gr.Button("Tune", variant="primary", elem_id="t-go")
            with gr.Row():
                t_plot = gr.Image(label="speedup against held-out quality", elem_id="t-plot")
                t_base = gr.Image(label="baseline", type="pil", elem_id="t-base")
                t_tuned = gr.Image(label="tuned", type="pil", elem_id="t-tuned")
                t_fewer = gr.Image(label="best fewer steps meeting the floor", type="pil", elem_id="t-fewer")
            with gr.Row():
                t_base_text = gr.Textbox(label="baseline output", lines=3, elem_id="t-base-text")
                t_tuned_text = gr.Textbox(label="tuned output", lines=3, elem_id="t-tuned-text")
            t_labels = gr.Markdown(elem_id="t-labels")
            t_table = gr.Markdown(elem_id="t-table")

            def tune_view(model: str, floor: str, budget: str, inputs: int, pairs: int, progress: Any = None) -> list:
                plot, table, base, tuned, fewer, labels = run_tune(model, floor, budget, inputs, pairs,
                                                                   progress=progress)
                texts = [x if isinstance(x, str) else "" for x in (base, tuned)]
                pics = [x if not isinstance(x, str) else None for x in (base, tuned, fewer)]
                return [plot, *pics, *texts, labels, table]

            tune_view.__name__ = "run_tune"
            bind(t_go, tune_view, [t_model, t_floor, t_budget, t_inputs, pairs],
                 [t_plot, t_base, t_tuned, t_fewer, t_base_text, t_tuned_text, t_labels, t_table])
        with gr.Tab("Analysis", elem_id="tab-analysis"):
            a_model = gr.Dropdown(lms, value=lms[0], allow_custom_value=True, elem_id="a-model",
                                  label="causal language model (zoo name or local folder)")
            a_text = gr.Textbox(Path(argparse.__file__).read_text()[:6000], lines=8, label="text to analyse",
                                elem_id="a-text")
            a_go = gr.Button("Analyse", variant="primary", elem_id="a-go")
            a_plots = gr.Gallery(label="depth report", columns=2, elem_id="a-plots")
            a_summary = gr.Markdown(elem_id="a-summary")
            bind(a_go, run_analysis, [a_model, a_text], [a_plots, a_summary])
    return app


def _parser() -> argparse.ArgumentParser:
    intro = __doc__.split("\n\n")[0].replace("\n", " ")
    return argparse.ArgumentParser(prog="mmskip app", description=intro + " Needs the app extra "
                                   "(pip install 'mmskip[app]').")


def main(argv: list[str] | None = None) -> int:
    """``mmskip app``: serve the app until interrupted; a port in use or a missing gradio is one line, exit 2."""
    p = _parser()
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 serves the network)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    p.add_argument("--share", action="store_true", help="also create a public gradio.live link (off by default)")
    args = p.parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ModuleNotFoundError:
        print("mmskip app: error: the app needs gradio: pip install 'mmskip[app]'", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        build_app().launch(server_name=args.host, server_port=args.port, share=args.share)
    except OSError as e:  # e.g. the port is in use
        print(f"mmskip app: error: {e}; pick another --port", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
