"""The app's Vision, Video and MuE tabs: p-MoD on ``digits-llava``, VideoLLM-MoD streamed on
``digits-video`` and MuE decoder exits on ``digits-florence``, each against the unmodified model
(answers, held-out accuracy, the work and KV cache kept, and a paired timing)."""

from __future__ import annotations

import functools
from typing import Any

import torch
from app_core import (
    DEFAULT_PAIRS,
    AppError,
    Progress,
    check_pairs,
    picture,
    speed_cell,
    stage,
    timed,
    timing_note,
    warnings_md,
)

import mmskip
from mmskip import schedules, zoo

VISION_PER_TYPE, VISION_EXAMPLES = 12, 36  # held-out questions per type (3 types) on digits-llava
MUE_PER_TYPE, MUE_EXAMPLES = 6, 24  # held-out tasks per type (4 types) on digits-florence
VIDEO_PER_TYPE, VIDEO_EXAMPLES = 6, 9  # held-out questions per type (4 types); of them, videos with two clips


def _check_keep(keep: float) -> float:
    if keep is None or not 0.0 < float(keep) <= 1.0:
        raise AppError(f"the keep ratio must lie in (0, 1], got {keep}")
    return float(keep)


def _check_example(example: Any, n: int) -> int:
    if example is None or not 0 <= int(example) < n:
        raise AppError(f"example must lie in 0..{n - 1}, got {example}")
    return int(example)


@functools.lru_cache(maxsize=1)
def _llava() -> tuple[Any, Any, Any]:
    from mmskip.zoo import llava_data

    model, tok = zoo.load("digits-llava")
    return model, tok, llava_data.heldout_set(tok, VISION_PER_TYPE)


@torch.no_grad()
def run_vision(example: int, keep: float, signal: str = "attention", pairs: int = DEFAULT_PAIRS,
               progress: Progress = None) -> tuple[Any, str]:
    """p-MoD on ``digits-llava``: one held-out grid and question answered with and without vision
    tokens skipping layers (``constant(keep)`` after the first layer), plus accuracy over the whole
    held-out set, the prefill FLOPs and the KV cache kept."""
    from mmskip.vision import MoDConfig

    from mmskip.zoo import llava_data

    check_pairs(pairs)
    keep = _check_keep(keep)
    stage(progress, 0.02, "loading digits-llava")
    model, tok, data = _llava()
    i = _check_example(example, len(data.questions))
    inputs = llava_data.encode(tok, data.pixel_values, data.questions)
    config = MoDConfig(schedule=schedules.constant(keep, first=1), signal=signal)
    out: dict[str, Any] = {}

    def predict() -> list[str]:
        ids = model(**inputs, logits_to_keep=1).logits[:, -1].argmax(-1).tolist()
        return tok.convert_ids_to_tokens(ids)

    def plain() -> None:
        out["plain"] = predict()

    def fast() -> None:
        with mmskip.applied(model, config) as handle:
            out["fast"] = predict()
            out["stats"] = handle.stats()

    name = f"p-MoD keep {keep:.2f} ({signal})"
    t = timed(plain, {name: fast}, pairs, progress, (0.1, 0.95),
              f"prefill of {len(data.questions)} questions, unmodified and with {name}")[name]
    plain_ans, fast_ans, stats = out["plain"], out["fast"], out["stats"]
    acc = [sum(p == a for p, a in zip(preds, data.answers)) / len(data.answers) for preds in (plain_ans, fast_ans)]
    fraction = stats.get("prefill_flops_fraction", 1.0)
    warn = warnings_md({name: (t, fraction)})
    md = "\n".join([
        f"**Q:** {data.questions[i]}  **gold:** {data.answers[i]}", "",
        f"| | unmodified | {name} |", "|---|---:|---:|",
        f"| this answer | {plain_ans[i]} | {fast_ans[i]} |",
        f"| held-out accuracy ({len(data.answers)} questions) | {acc[0]:.2f} | {acc[1]:.2f} |",
        f"| prefill seconds, all questions (median) | {t.baseline_seconds:.3f} | {t.seconds:.3f} |",
        f"| speedup (quartiles, pairs) | 1.00× | {speed_cell(t)} |",
        f"| prefill FLOPs fraction | 1.00 | {fraction:.2f} |",
        f"| KV cache kept | 1.00 | {stats.get('kv_fraction', 1.0):.2f} |",
    ]) + (f"\n\n{warn}" if warn else "") + f"\n\n{timing_note(t.pairs)}"
    return picture(data.pixel_values[i, 0], 256), md


@functools.lru_cache(maxsize=1)
def _florence() -> tuple[Any, Any, Any]:
    from mmskip.zoo import florence_data

    model, tok = zoo.load("digits-florence")
    return model, tok, florence_data.heldout_set(tok, MUE_PER_TYPE)


@torch.no_grad()
def run_mue(example: int, threshold: float, pairs: int = DEFAULT_PAIRS, progress: Progress = None) -> tuple[Any, str]:
    """MuE decoder exits on ``digits-florence``: a token leaves the decoder once two successive
    layers' states agree to ``threshold`` (cosine); answers, exact match and decoder work run."""
    from mmskip.vision import MuEConfig

    from mmskip.zoo import florence_data

    check_pairs(pairs)
    if threshold is None or not 0.0 < float(threshold) <= 1.0:
        raise AppError(f"the exit threshold must lie in (0, 1], got {threshold}")
    threshold = float(threshold)
    stage(progress, 0.02, "loading digits-florence")
    model, tok, data = _florence()
    i = _check_example(example, len(data))
    cfg = MuEConfig(image_threshold=None, text_threshold=None, decoder_threshold=threshold, decay=1.0,
                    floor=threshold, min_layers=1)
    out: dict[str, Any] = {}

    def plain() -> None:
        out["plain"] = florence_data.answers(model, tok, data)

    def fast() -> None:
        with mmskip.applied(model, cfg) as handle:
            out["fast"] = florence_data.answers(model, tok, data)
            out["decoder"] = handle.stats().get("decoder") or {}

    name = f"MuE exits at {threshold:.2f}"
    t = timed(plain, {name: fast}, pairs, progress, (0.1, 0.95),
              f"answering {len(data)} tasks, unmodified and with {name}")[name]
    plain_ans, fast_ans, dec = out["plain"], out["fast"], out["decoder"]
    work = dec["run"] / dec["layer_tokens"] if dec.get("layer_tokens") else 1.0
    md = "\n".join([
        f"**task:** {data.prompts[i]}  **gold:** {data.targets[i]}", "",
        f"| | unmodified | {name} |", "|---|---:|---:|",
        f"| this answer | {plain_ans[i]} | {fast_ans[i]} |",
        f"| exact match ({len(data)} held-out tasks) | {florence_data.score(plain_ans, data)['all']:.2f} | "
        f"{florence_data.score(fast_ans, data)['all']:.2f} |",
        f"| seconds, all tasks (median) | {t.baseline_seconds:.3f} | {t.seconds:.3f} |",
        f"| speedup (quartiles, pairs) | 1.00× | {speed_cell(t)} |",
        f"| decoder layer-tokens run | 1.00 | {work:.2f} |",
    ]) + f"\n\n{timing_note(t.pairs)}"
    return picture(data.pixel_values[i, 0]), md


@functools.lru_cache(maxsize=1)
def _video() -> tuple[Any, Any, Any, list[int]]:
    from mmskip.zoo import video_data

    model, tok = zoo.load("digits-video")
    data = video_data.heldout_set(tok, VIDEO_PER_TYPE)
    two = [i for i in range(len(data.questions)) if int(data.videos.n_clips[i]) == 2]
    return model, tok, data, two


def video_strip(frames: torch.Tensor, n_clips: int) -> torch.Tensor:
    """Every clip of a video as one grey image: a row of frames per clip, a blank line between."""
    rows = [torch.cat(list(frames[c]), dim=1) for c in range(n_clips)]
    gap = torch.zeros(2, rows[0].shape[1], dtype=rows[0].dtype)
    return torch.cat([x for r in rows for x in (r, gap)][:-1], dim=0)


@torch.no_grad()
def run_video(example: int, keep: float, pairs: int = DEFAULT_PAIRS, progress: Progress = None) -> tuple[Any, str]:
    """VideoLLM-MoD on ``digits-video``, streamed clip by clip into one cache, then asked: answers,
    accuracy over held-out two-clip videos and the KV cache per frame."""
    from mmskip.vision import VideoMoDConfig, VideoStream

    from mmskip.zoo import video_data

    check_pairs(pairs)
    keep = _check_keep(keep)
    stage(progress, 0.02, "loading digits-video")
    model, tok, data, two = _video()
    if not two:
        raise AppError("no two-clip videos in the held-out set")
    j = _check_example(example, len(two))
    cfg = VideoMoDConfig(schedule=schedules.constant(keep))

    def stream(i: int) -> tuple[str, float]:
        s = VideoStream(model, prefix=torch.tensor(video_data.prefix_ids(tok)))
        for clip in video_data.pixel_values_videos([data.videos.clips()[i]]):
            s.add_clip(clip)
        got = s.ask(torch.tensor(video_data.question_ids(tok, data.questions[i])))
        return tok.convert_ids_to_tokens(int(got[0, 0])), s.kv_bytes() / s.frames

    def run_all() -> tuple[list[str], float]:
        got = [stream(i) for i in two]
        return [a for a, _ in got], sum(k for _, k in got) / len(got)

    out: dict[str, Any] = {}

    def plain() -> None:
        out["plain"] = run_all()

    def fast() -> None:
        with mmskip.applied(model, cfg):
            out["fast"] = run_all()

    name = f"VideoLLM-MoD keep {keep:.2f}"
    t = timed(plain, {name: fast}, pairs, progress, (0.1, 0.95),
              f"streaming {len(two)} videos, unmodified and with {name}")[name]
    (plain_ans, kv_plain), (fast_ans, kv_fast) = out["plain"], out["fast"]
    answers = [data.answers[i] for i in two]
    acc = [sum(p == a for p, a in zip(preds, answers)) / len(answers) for preds in (plain_ans, fast_ans)]
    i = two[j]
    md = "\n".join([
        f"**Q:** {data.questions[i]}  **gold:** {data.answers[i]}", "",
        f"| | unmodified | {name} |", "|---|---:|---:|",
        f"| this answer | {plain_ans[j]} | {fast_ans[j]} |",
        f"| accuracy ({len(two)} held-out two-clip videos) | {acc[0]:.2f} | {acc[1]:.2f} |",
        f"| seconds, stream + ask all videos (median) | {t.baseline_seconds:.3f} | {t.seconds:.3f} |",
        f"| speedup (quartiles, pairs) | 1.00× | {speed_cell(t)} |",
        f"| KV cache per frame | {kv_plain / 1024:.0f} KiB | {kv_fast / 1024:.0f} KiB |",
    ]) + f"\n\n{timing_note(t.pairs)}"
    return picture(video_strip(data.videos.frames[i], int(data.videos.n_clips[i]))), md
