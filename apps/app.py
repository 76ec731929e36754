"""The Gradio app: try mmskip's techniques on the zoo's models (or local ones) and see speed and
quality side by side.

    mmskip app                      # http://127.0.0.1:7860, no share link
    mmskip app --port 8000 --share  # a public gradio.live link, only when asked

Tabs: Language (code completion: plain vs a technique, tokens/s, agreement, identical-output
badge for lossless SWIFT), Diffusion (baseline vs accelerated image from the same seed, speedup,
PSNR, FLOPs fraction, and "fewer steps in the same time"), Vision (p-MoD on ``digits-llava``:
keep-ratio slider, answers, accuracy, prefill FLOPs and KV kept), Video (VideoLLM-MoD streamed on
``digits-video``: KV per frame), MuE (decoder exits on ``digits-florence``), Analysis (the depth
report's plots).
Needs the ``app`` extra (``pip install 'mmskip[app]'``).
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import mmskip
from mmskip import schedules, zoo
from mmskip.zoo.data import caption

LANGUAGE_MODELS = ["stdlib-lm", "stdlib-lm-skip"]
DIFFUSION_MODELS = ["digits-dit", "digits-sd"]
LM_TECHNIQUES = ["Unified Layer Skipping s=1.5", "Unified Layer Skipping s=2", "FFN-SkipLLM", "void layers",
                 "SWIFT (lossless)"]
DIFF_TECHNIQUES = ["feature inheritance, every k-th step", "feature inheritance, non-uniform",
                   "analytic early steps (Gaussian teleport)", "fewer steps"]
_STATS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"  # fitted Gaussian statistics per zoo model


class AppError(ValueError):
    """Bad input the UI shows as a message (the app keeps serving)."""


# -- language -------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _lm(name: str) -> tuple[Any, Any]:
    from mmskip.eval.lm import load_lm

    try:
        return load_lm(name)
    except (FileNotFoundError, ValueError) as e:
        raise AppError(str(e)) from e


def lm_config(technique: str) -> mmskip.SkipConfig:
    if technique.startswith("Unified"):
        return mmskip.LayerSkipConfig(schedule=schedules.unified(float(technique.rsplit("=", 1)[1])))
    if technique == "FFN-SkipLLM":
        return mmskip.FFNSkipConfig()
    if technique == "void layers":
        return mmskip.VoidLayerConfig()
    if technique.startswith("SWIFT"):
        from mmskip.speculative import SelfSpeculativeConfig

        return SelfSpeculativeConfig()
    raise AppError(f"unknown technique {technique!r}; choose one of {LM_TECHNIQUES}")


@torch.no_grad()
def run_language(model_name: str, prompt: str, technique: str, new_tokens: int = 48) -> tuple[str, str, str]:
    """(plain completion, accelerated completion, markdown stats) for one prompt, batch 1."""
    if not prompt or not prompt.strip():
        raise AppError("the prompt is empty: type the start of some Python code")
    model, tok = _lm(model_name.strip())
    ids = tok(prompt, return_tensors="pt").input_ids
    kwargs = dict(max_new_tokens=int(new_tokens), do_sample=False, pad_token_id=tok.eos_token_id)
    model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=tok.eos_token_id)  # warm-up
    t0 = time.perf_counter()
    plain = model.generate(ids, **kwargs)[0, ids.shape[1]:]
    t_plain = time.perf_counter() - t0
    try:
        handle = mmskip.apply(model, lm_config(technique))
    except (TypeError, ValueError) as e:
        raise AppError(f"{technique} does not fit {model_name}: {e}") from e
    try:
        t0 = time.perf_counter()
        fast = model.generate(ids, **kwargs)[0, ids.shape[1]:]
        t_fast = time.perf_counter() - t0
        stats = handle.stats()
    finally:
        handle.remove()
    n = min(len(plain), len(fast))
    agree = float((plain[:n] == fast[:n]).float().mean()) if n else 1.0
    identical = torch.equal(plain, fast)
    badge = "**identical output** ✅" if identical else f"differs from plain (position-wise agreement {agree:.2f})"
    fraction = stats.get("flops_fraction")
    lines = [f"| | plain | {technique} |", "|---|---:|---:|",
             f"| tokens/s | {len(plain) / t_plain:.1f} | {len(fast) / t_fast:.1f} |",
             f"| speedup | 1.00× | {t_plain / t_fast:.2f}× |"]
    if fraction is not None:
        lines.append(f"| FLOPs fraction | 1.00 | {fraction:.2f} |")
    if "acceptance_rate" in stats:
        lines.append(f"| draft acceptance | - | {stats['acceptance_rate']:.2f} |")
    md = "\n".join(lines) + f"\n\n{badge}"
    return tok.decode(plain, skip_special_tokens=True), tok.decode(fast, skip_special_tokens=True), md


# -- diffusion ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def _pipe(name: str) -> Any:
    from mmskip.pipelines import SkipDiTPipeline, SkipStableDiffusionPipeline

    cls = SkipDiTPipeline if name == "digits-dit" else SkipStableDiffusionPipeline
    try:
        folder = zoo.path(name) if name in zoo.NAMES else Path(name)
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{name!r} is neither a zoo model ({', '.join(DIFFUSION_MODELS)}) nor a folder")
        pipe = cls.from_pretrained(folder, dtype=torch.float32)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise AppError(str(e)) from e
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe: Any, name: str, digit: int, steps: int, seed: int) -> tuple[Any, float]:
    g = torch.Generator().manual_seed(int(seed))
    t0 = time.perf_counter()
    if name == "digits-dit":
        out = pipe(class_labels=[int(digit)], num_inference_steps=steps, guidance_scale=4.0, generator=g,
                   output_type="pil")
    else:
        out = pipe([caption(digit)], num_inference_steps=steps, guidance_scale=4.0,
                   generator=g, output_type="pil")
    return out.images[0], time.perf_counter() - t0


def diffusion_config(technique: str, steps: int, k: int, granularity: str = "block", teleport: float = 0.3,
                     model_name: str = "digits-dit") -> Any:
    from mmskip.diffusion import FeatureInheritanceConfig, GaussianTeleportConfig, nonuniform

    try:
        if technique == DIFF_TECHNIQUES[0]:
            return FeatureInheritanceConfig(schedule=schedules.interval(int(k)), granularity=granularity)
        if technique == DIFF_TECHNIQUES[1]:
            return FeatureInheritanceConfig(schedule=nonuniform(steps, max(2, steps // int(k))), granularity=granularity)
        if technique == DIFF_TECHNIQUES[2]:
            stats = _STATS / f"diffusion_gaussian_{model_name}.safetensors"
            if not stats.is_file():
                raise AppError(f"no fitted Gaussian statistics for {model_name!r} ({stats.name}); "
                               "benchmarks/diffusion.py fits them for the zoo models")
            return GaussianTeleportConfig(stats_path=str(stats), skip_fraction=float(teleport))
    except ValueError as e:
        raise AppError(str(e)) from e
    raise AppError(f"unknown technique {technique!r}")


@torch.no_grad()
def run_diffusion(model_name: str, digit: int, technique: str, steps: int = 30, k: int = 3,
                  seed: int = 0, granularity: str = "block", teleport: float = 0.3,
                  progress: Any = None) -> tuple[Any, Any, Any, str]:
    """(baseline image, accelerated image, same-time fewer-steps image, markdown stats)."""
    from mmskip.eval import psnr

    steps, k = int(steps), int(k)
    if steps < 2 or k < 1:
        raise AppError("steps must be >= 2 and k >= 1")
    if progress is not None:
        progress(0.05, desc="loading the pipeline")
    pipe = _pipe(model_name.strip())
    _generate(pipe, model_name, digit, 2, seed)  # warm-up
    if progress is not None:
        progress(0.2, desc=f"baseline: {steps} steps")
    fraction, config = None, None
    if technique == "fewer steps":
        fast_steps, label = max(2, steps // k), f"DDIM-{max(2, steps // k)}"
    else:
        fast_steps, label = steps, technique
        config = diffusion_config(technique, steps, k, granularity, teleport, model_name)
    t_base = t_fast = float("inf")
    for _ in range(2):  # round-robin, best of two: one busy moment does not decide the ratio
        base, t = _generate(pipe, model_name, digit, steps, seed)
        t_base = min(t_base, t)
        if config is not None:
            try:
                pipe.enable_skip(config)
            except (TypeError, ValueError) as e:
                raise AppError(f"{technique} does not fit {model_name}: {e}") from e
        try:
            if progress is not None:
                progress(0.5, desc=label)
            fast, t = _generate(pipe, model_name, digit, fast_steps, seed)
            if config is not None and hasattr(pipe, "skip_stats"):
                fraction = pipe.skip_stats().get("flops_fraction")
        finally:
            if config is not None:
                pipe.disable_skip()
        t_fast = min(t_fast, t)
    speedup = t_base / t_fast
    same_time = min(steps, max(2, round(steps / speedup)))  # a slower technique: compare with the full run
    if progress is not None:
        progress(0.8, desc=f"fewer steps in the same time: {same_time}")
    fewer, _ = _generate(pipe, model_name, digit, same_time, seed)

    def arr(img: Any) -> torch.Tensor:
        import numpy as np

        return torch.from_numpy(np.asarray(img.convert("L"), dtype="float32") / 255.0)[None, None]

    md = "\n".join([
        f"| | baseline ({steps} steps) | {label} | fewer steps, same time ({same_time}) |", "|---|---:|---:|---:|",
        f"| seconds | {t_base:.2f} | {t_fast:.2f} | - |",
        f"| speedup | 1.00× | **{speedup:.2f}×** | ≈{speedup:.2f}× |",
        f"| PSNR to baseline | - | {psnr(arr(fast), arr(base)):.1f} dB | {psnr(arr(fewer), arr(base)):.1f} dB |",
    ] + ([f"| FLOPs fraction | 1.00 | {fraction:.2f} | - |"] if fraction is not None else []))
    return _enlarge(base), _enlarge(fast), _enlarge(fewer), md


def _enlarge(pic: Any, height: int = 256) -> Any:
    """A PIL image of the tiny zoo models, enlarged (nearest neighbour) for the screen."""
    from PIL import Image

    return pic.resize((pic.width * height // pic.height, height), Image.NEAREST)


# -- vision ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _llava(n_per_type: int = 12) -> tuple[Any, Any, Any]:
    from mmskip.zoo import llava_data

    model, tok = zoo.load("digits-llava")
    return model, tok, llava_data.heldout_set(tok, n_per_type)


@torch.no_grad()
def run_vision(example: int, keep: float, signal: str = "attention") -> tuple[Any, str]:
    """p-MoD on ``digits-llava``: one held-out grid and question answered with and without vision
    tokens skipping layers (``constant(keep)`` after the first layer), plus accuracy over the whole
    held-out set, the prefill FLOPs and the KV cache kept."""
    from mmskip.vision import MoDConfig

    from mmskip.zoo import llava_data

    if not 0.0 < keep <= 1.0:
        raise AppError("the keep ratio must lie in (0, 1]")
    model, tok, data = _llava()
    if not 0 <= int(example) < len(data.questions):
        raise AppError(f"example must lie in 0..{len(data.questions) - 1}")
    inputs = llava_data.encode(tok, data.pixel_values, data.questions)

    def predict() -> tuple[list[str], float]:
        t0 = time.perf_counter()
        ids = model(**inputs, logits_to_keep=1).logits[:, -1].argmax(-1).tolist()
        return tok.convert_ids_to_tokens(ids), time.perf_counter() - t0

    predict()  # warm-up
    plain, t_plain = predict()
    handle = mmskip.apply(model, MoDConfig(schedule=schedules.constant(float(keep), first=1), signal=signal))
    try:
        fast, t_fast = predict()
        stats = handle.stats()
    finally:
        handle.remove()
    i = int(example)
    acc = [sum(p == a for p, a in zip(preds, data.answers)) / len(data.answers) for preds in (plain, fast)]
    md = "\n".join([
        f"**Q:** {data.questions[i]}  **gold:** {data.answers[i]}", "",
        f"| | unmodified | p-MoD keep {keep:.2f} ({signal}) |", "|---|---:|---:|",
        f"| this answer | {plain[i]} | {fast[i]} |",
        f"| held-out accuracy ({len(data.answers)} questions) | {acc[0]:.2f} | {acc[1]:.2f} |",
        f"| prefill seconds (all questions) | {t_plain:.2f} | {t_fast:.2f} |",
        f"| prefill FLOPs fraction | 1.00 | {stats.get('prefill_flops_fraction', 1.0):.2f} |",
        f"| KV cache kept | 1.00 | {stats.get('kv_fraction', 1.0):.2f} |",
    ])
    return _picture(data.pixel_values[i, 0], 256), md


def _picture(img: torch.Tensor, height: int = 128) -> Any:
    """A grey image in [0, 1] or [-1, 1], enlarged (nearest neighbour) for the screen."""
    from PIL import Image

    img = ((img + 1) / 2 if img.min() < 0 else img).clamp(0, 1)
    return _enlarge(Image.fromarray((img.numpy() * 255).astype("uint8")), height)


@functools.lru_cache(maxsize=1)
def _florence() -> tuple[Any, Any, Any]:
    from mmskip.zoo import florence_data

    model, tok = zoo.load("digits-florence")
    return model, tok, florence_data.heldout_set(tok, 6)


@torch.no_grad()
def run_mue(example: int, threshold: float) -> tuple[Any, str]:
    """MuE decoder exits on ``digits-florence``: a token leaves the decoder once two successive
    layers' states agree to ``threshold`` (cosine); answers, exact match and decoder work run."""
    from mmskip.vision import MuEConfig

    from mmskip.zoo import florence_data

    if not 0.0 < threshold <= 1.0:
        raise AppError("the exit threshold must lie in (0, 1]")
    model, tok, data = _florence()
    if not 0 <= int(example) < len(data):
        raise AppError(f"example must lie in 0..{len(data) - 1}")
    t0 = time.perf_counter()
    plain = florence_data.answers(model, tok, data)
    t_plain = time.perf_counter() - t0
    cfg = MuEConfig(image_threshold=None, text_threshold=None, decoder_threshold=float(threshold), decay=1.0,
                    floor=float(threshold), min_layers=1)
    with mmskip.applied(model, cfg) as handle:
        t0 = time.perf_counter()
        fast = florence_data.answers(model, tok, data)
        t_fast = time.perf_counter() - t0
        dec = handle.stats().get("decoder") or {}
    i = int(example)
    work = dec["run"] / dec["layer_tokens"] if dec.get("layer_tokens") else 1.0
    md = "\n".join([
        f"**task:** {data.prompts[i]}  **gold:** {data.targets[i]}", "",
        f"| | unmodified | MuE exits at {threshold:.2f} |", "|---|---:|---:|",
        f"| this answer | {plain[i]} | {fast[i]} |",
        f"| exact match ({len(data)} held-out tasks) | {florence_data.score(plain, data)['all']:.2f} | "
        f"{florence_data.score(fast, data)['all']:.2f} |",
        f"| seconds (all tasks) | {t_plain:.2f} | {t_fast:.2f} |",
        f"| decoder layer-tokens run | 1.00 | {work:.2f} |",
    ])
    return _picture(data.pixel_values[i, 0]), md


@functools.lru_cache(maxsize=1)
def _video() -> tuple[Any, Any, Any, list[int]]:
    from mmskip.zoo import video_data

    model, tok = zoo.load("digits-video")
    data = video_data.heldout_set(tok, 8)
    two = [i for i in range(len(data.questions)) if int(data.videos.n_clips[i]) == 2]
    return model, tok, data, two


@torch.no_grad()
def run_video(example: int, keep: float) -> tuple[Any, str]:
    """VideoLLM-MoD on ``digits-video``, streamed clip by clip into one cache, then asked: answers,
    accuracy over held-out two-clip videos and the KV cache per frame."""
    from mmskip.vision import VideoMoDConfig, VideoStream

    from mmskip.zoo import video_data

    if not 0.0 < keep <= 1.0:
        raise AppError("the keep ratio must lie in (0, 1]")
    model, tok, data, two = _video()
    if not two:
        raise AppError("no two-clip videos in the held-out set")
    if not 0 <= int(example) < len(two):
        raise AppError(f"example must lie in 0..{len(two) - 1}")

    def stream(i: int) -> tuple[str, float]:
        s = VideoStream(model, prefix=torch.tensor(video_data.prefix_ids(tok)))
        for clip in video_data.pixel_values_videos([data.videos.clips()[i]]):
            s.add_clip(clip)
        got = s.ask(torch.tensor(video_data.question_ids(tok, data.questions[i])))
        return tok.convert_ids_to_tokens(int(got[0, 0])), s.kv_bytes() / s.frames

    def run_all() -> tuple[list[str], float, float]:
        t0 = time.perf_counter()
        out = [stream(i) for i in two]
        return [a for a, _ in out], sum(k for _, k in out) / len(out), time.perf_counter() - t0

    plain, kv_plain, t_plain = run_all()
    with mmskip.applied(model, VideoMoDConfig(schedule=schedules.constant(float(keep)))):
        fast, kv_fast, t_fast = run_all()
    answers = [data.answers[i] for i in two]
    acc = [sum(p == a for p, a in zip(preds, answers)) / len(answers) for preds in (plain, fast)]
    j, i = int(example), two[int(example)]
    frames = data.videos.frames[i, 0]  # the first clip's frames, side by side
    md = "\n".join([
        f"**Q:** {data.questions[i]}  **gold:** {data.answers[i]}", "",
        f"| | unmodified | VideoLLM-MoD keep {keep:.2f} |", "|---|---:|---:|",
        f"| this answer | {plain[j]} | {fast[j]} |",
        f"| accuracy ({len(two)} held-out two-clip videos) | {acc[0]:.2f} | {acc[1]:.2f} |",
        f"| seconds (stream + ask, all videos) | {t_plain:.2f} | {t_fast:.2f} |",
        f"| KV cache per frame | {kv_plain / 1024:.0f} KiB | {kv_fast / 1024:.0f} KiB |",
    ])
    return _picture(torch.cat(list(frames), dim=1)), md


# -- analysis -------------------------------------------------------------------------------------

def run_analysis(model_name: str, text: str, progress: Any = None) -> tuple[list[str], str]:
    """The depth report's plots (paths) and its text summary for ``text``."""
    from mmskip.analysis.cli import chunk_text, summary
    from mmskip.analysis.depth import depth_report

    if not text or len(text.strip()) < 40:
        raise AppError("paste some code or text to analyse (a few hundred characters at least)")
    model, tok = _lm(model_name.strip())
    try:
        ids = chunk_text(tok, text, 4, 64)
    except ValueError as e:
        raise AppError(str(e)) from e
    if progress is not None:
        progress(0.1, desc="analysing every layer")
    report = depth_report(model, ids, void_prompts=2, void_new_tokens=8)
    paths = report.plot(tempfile.mkdtemp(prefix="mmskip-app-"))
    return [str(p) for p in paths], f"```\n{summary(report)}\n```"


# -- the app --------------------------------------------------------------------------------------

def _ui(fn):
    """Wrap a run_* function so bad input shows as a message in the UI, not a traceback."""
    import gradio as gr

    @functools.wraps(fn)
    def wrapped(*args, progress=gr.Progress(), **kwargs):  # noqa: B008 (gradio injects the tracker)
        try:
            if "progress" in fn.__code__.co_varnames:
                kwargs["progress"] = progress
            return fn(*args, **kwargs)
        except AppError as e:
            raise gr.Error(str(e)) from e
    return wrapped


def build_app() -> Any:
    import gradio as gr

    example = "import os\n\n\ndef read_lines(path):\n"
    with gr.Blocks(title="mmskip") as app:
        gr.Markdown("# mmskip — skip what does not matter\nEvery number below is measured in this run, on this machine.")
        with gr.Tab("Language"):
            with gr.Row():
                lm_model = gr.Dropdown(LANGUAGE_MODELS, value="stdlib-lm-skip", allow_custom_value=True,
                                       label="model (zoo name or local folder)", elem_id="lm-model")
                lm_tech = gr.Dropdown(LM_TECHNIQUES, value=LM_TECHNIQUES[0], label="technique", elem_id="lm-tech")
                lm_tokens = gr.Slider(8, 128, value=48, step=8, label="new tokens")
            lm_prompt = gr.Textbox(example, lines=4, label="prompt", elem_id="lm-prompt")
            lm_go = gr.Button("Complete", variant="primary", elem_id="lm-go")
            with gr.Row():
                lm_plain = gr.Textbox(label="plain", lines=6, elem_id="lm-plain")
                lm_fast = gr.Textbox(label="with the technique", lines=6, elem_id="lm-fast")
            lm_stats = gr.Markdown(elem_id="lm-stats")
            lm_go.click(_ui(run_language), [lm_model, lm_prompt, lm_tech, lm_tokens], [lm_plain, lm_fast, lm_stats])
        with gr.Tab("Diffusion"):
            with gr.Row():
                d_model = gr.Dropdown(DIFFUSION_MODELS, value="digits-dit", allow_custom_value=True,
                                      label="pipeline (zoo name or local folder)", elem_id="d-model")
                d_digit = gr.Slider(0, 9, value=3, step=1, label="digit (class / prompt)")
                d_tech = gr.Dropdown(DIFF_TECHNIQUES, value=DIFF_TECHNIQUES[0], label="technique", elem_id="d-tech")
            with gr.Row():
                d_steps = gr.Slider(4, 100, value=30, step=1, label="sampler steps")
                d_k = gr.Slider(1, 10, value=3, step=1, label="k (inherit every k-th step / k× fewer)")
                d_seed = gr.Number(0, precision=0, label="seed")
            with gr.Row():
                d_gran = gr.Dropdown(["block", "layer", "unit"], value="block", label="inheritance granularity")
                d_tele = gr.Slider(0.0, 0.9, value=0.3, step=0.05, label="teleport: fraction of early steps replaced")
            d_go = gr.Button("Generate", variant="primary", elem_id="d-go")
            with gr.Row():
                d_base = gr.Image(label="baseline", type="pil", elem_id="d-base")
                d_fast = gr.Image(label="accelerated", type="pil", elem_id="d-fast")
                d_fewer = gr.Image(label="fewer steps, same time", type="pil", elem_id="d-fewer")
            d_stats = gr.Markdown(elem_id="d-stats")
            d_go.click(_ui(run_diffusion), [d_model, d_digit, d_tech, d_steps, d_k, d_seed, d_gran, d_tele],
                       [d_base, d_fast, d_fewer, d_stats])
        with gr.Tab("Vision"):
            gr.Markdown("p-MoD on `digits-llava`: vision tokens skip decoder layers; 4×4 grids of digits with "
                        "questions about a position, a count or a sum.")
            with gr.Row():
                v_example = gr.Slider(0, 35, value=0, step=1, label="held-out example")
                v_keep = gr.Slider(0.05, 1.0, value=0.3, step=0.05, label="vision tokens kept per layer")
                v_signal = gr.Dropdown(["attention", "norm"], value="attention", label="which tokens (signal)")
            v_go = gr.Button("Answer", variant="primary", elem_id="v-go")
            with gr.Row():
                v_image = gr.Image(label="grid", type="pil")
                v_stats = gr.Markdown(elem_id="v-stats")
            v_go.click(_ui(run_vision), [v_example, v_keep, v_signal], [v_image, v_stats])
        with gr.Tab("Video"):
            gr.Markdown("VideoLLM-MoD on `digits-video`: each frame keeps its top vision tokens per layer; "
                        "clips stream into one cache, then the question is asked.")
            with gr.Row():
                vv_example = gr.Slider(0, 7, value=0, step=1, label="held-out two-clip video")
                vv_keep = gr.Slider(0.05, 1.0, value=0.2, step=0.05, label="vision tokens kept per frame and layer")
            vv_go = gr.Button("Stream and ask", variant="primary")
            vv_image = gr.Image(label="first clip", type="pil")
            vv_stats = gr.Markdown()
            vv_go.click(_ui(run_video), [vv_example, vv_keep], [vv_image, vv_stats])
        with gr.Tab("MuE"):
            gr.Markdown("MuE on `digits-florence`: decoder tokens exit early once successive layers agree.")
            with gr.Row():
                m_example = gr.Slider(0, 23, value=0, step=1, label="held-out task")
                m_threshold = gr.Slider(0.5, 1.0, value=0.9, step=0.01, label="decoder exit threshold (cosine)")
            m_go = gr.Button("Caption / answer", variant="primary")
            m_image = gr.Image(label="strip", type="pil")
            m_stats = gr.Markdown()
            m_go.click(_ui(run_mue), [m_example, m_threshold], [m_image, m_stats])
        with gr.Tab("Analysis"):
            a_model = gr.Dropdown(LANGUAGE_MODELS, value="stdlib-lm", allow_custom_value=True, label="model")
            a_text = gr.Textbox(Path(argparse.__file__).read_text()[:6000], lines=8, label="text to analyse")
            a_go = gr.Button("Analyse", variant="primary")
            a_plots = gr.Gallery(label="depth report", columns=2)
            a_summary = gr.Markdown()
            a_go.click(_ui(run_analysis), [a_model, a_text], [a_plots, a_summary])
    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mmskip app", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="create a public gradio.live link")
    args = p.parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ModuleNotFoundError:
        print("mmskip app: error: the app needs gradio: pip install 'mmskip[app]'", file=sys.stderr)
        return 2
    try:
        build_app().launch(server_name=args.host, server_port=args.port, share=args.share)
    except OSError as e:  # e.g. the port is in use
        print(f"mmskip app: error: {e}; pick another --port", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
