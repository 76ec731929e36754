"""The app's Diffusion tab: the baseline sampler against a technique from the same seed, and against
the same sampler with fewer steps in the same time; every speed paired-timed against the baseline.

Each technique has its own knob (what "k" meant differed by technique):

* feature inheritance, every k-th step: recompute one step in ``every`` (the rest inherit features);
* feature inheritance, non-uniform: ``computed`` of the sampler's steps recomputed, denser early;
* Gaussian teleport: the first ``teleport`` fraction of the steps replaced analytically;
* fewer steps: the sampler runs ``fewer`` steps.

Inheritance also takes a ``granularity`` (block, layer or unit).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
from app_core import (
    DEFAULT_PAIRS,
    AppError,
    Progress,
    bound_cell,
    check_pairs,
    enlarge,
    speed_cell,
    stage,
    timed,
    timing_note,
    warnings_md,
)

from mmskip import schedules, zoo
from mmskip.zoo.data import caption

DIFFUSION_MODELS = ["digits-dit", "digits-sd"]
INHERIT_EVERY, INHERIT_NONUNIFORM, TELEPORT, FEWER = DIFF_TECHNIQUES = [
    "feature inheritance, every k-th step", "feature inheritance, non-uniform",
    "analytic early steps (Gaussian teleport)", "fewer steps"]
GRANULARITIES = ["block", "layer", "unit"]
_STATS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"  # fitted Gaussian statistics per zoo model


def controls_for(technique: str) -> dict[str, bool]:
    """Which technique knobs the tab shows for ``technique`` (the others are hidden)."""
    return {"every": technique == INHERIT_EVERY, "computed": technique == INHERIT_NONUNIFORM,
            "granularity": technique in (INHERIT_EVERY, INHERIT_NONUNIFORM), "teleport": technique == TELEPORT,
            "fewer": technique == FEWER}


def _pipeline_classes() -> dict[str, type]:
    from mmskip.pipelines import SkipDiTPipeline, SkipStableDiffusionPipeline

    return {"DiTPipeline": SkipDiTPipeline, "SkipDiTPipeline": SkipDiTPipeline,
            "StableDiffusionPipeline": SkipStableDiffusionPipeline,
            "SkipStableDiffusionPipeline": SkipStableDiffusionPipeline}


def pipeline_folder(name: str) -> tuple[Path, type]:
    """The folder and drop-in class for the pipeline field's value, or an :class:`AppError` saying
    what the field takes (an empty field is not the server's working directory)."""
    name = (name or "").strip()
    offered = ", ".join(DIFFUSION_MODELS)
    if not name:
        raise AppError(f"the pipeline field is empty: choose a zoo pipeline ({offered}) or type the path of a "
                       "local diffusers DiT / Stable Diffusion folder (one with model_index.json) on the server")
    if name in zoo.NAMES and name not in DIFFUSION_MODELS:
        raise AppError(f"{name!r} is a zoo model but not a pipeline this tab runs; choose {offered} or a local folder")
    folder = zoo.path(name) if name in zoo.NAMES else Path(name).expanduser()
    if not folder.is_dir():
        raise AppError(f"{name!r} is neither a zoo pipeline ({offered}) nor a folder on the server")
    index = folder / "model_index.json"
    if not index.is_file():
        raise AppError(f"{name!r} has no model_index.json: not a diffusers pipeline folder")
    try:
        class_name = json.loads(index.read_text()).get("_class_name")
    except ValueError as e:
        raise AppError(f"{name!r}: model_index.json is not valid JSON ({e})") from e
    classes = _pipeline_classes()
    if class_name not in classes:
        raise AppError(f"{name!r} holds a {class_name}; this tab runs DiTPipeline and StableDiffusionPipeline folders")
    return folder, classes[class_name]


@functools.lru_cache(maxsize=2)
def _load(folder: Path, cls: type) -> Any:
    pipe = cls.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe: Any, digit: int, steps: int, seed: int) -> Any:
    from mmskip.pipelines import SkipDiTPipeline

    g = torch.Generator().manual_seed(int(seed))
    if isinstance(pipe, SkipDiTPipeline):
        out = pipe(class_labels=[int(digit)], num_inference_steps=steps, guidance_scale=4.0, generator=g,
                   output_type="pil")
    else:
        out = pipe([caption(digit)], num_inference_steps=steps, guidance_scale=4.0, generator=g, output_type="pil")
    return out.images[0]


def diffusion_setup(technique: str, steps: int, every: int = 3, computed: int = 10, granularity: str = "block",
                    teleport: float = 0.3, fewer: int = 10, model_name: str = "digits-dit") -> tuple[str, int, Any]:
    """(what ran, in words with its setting; the sampler steps it runs; its config or None for
    plain fewer steps) for one technique and its own knob."""
    from mmskip.diffusion import FeatureInheritanceConfig, GaussianTeleportConfig, nonuniform

    try:
        if technique == INHERIT_EVERY:
            label = f"feature inheritance: recompute 1 step in {int(every)} ({granularity} granularity)"
            return label, steps, FeatureInheritanceConfig(schedule=schedules.interval(int(every)),
                                                          granularity=granularity)
        if technique == INHERIT_NONUNIFORM:
            label = f"feature inheritance: {int(computed)} of {steps} steps recomputed, non-uniform ({granularity} granularity)"
            return label, steps, FeatureInheritanceConfig(schedule=nonuniform(steps, int(computed)),
                                                          granularity=granularity)
        if technique == TELEPORT:
            stats = _STATS / f"diffusion_gaussian_{Path(model_name.strip()).name}.safetensors"
            if not stats.is_file():
                raise AppError(f"no fitted Gaussian statistics for {model_name!r} ({stats.name}); "
                               "benchmarks/diffusion.py fits them for the zoo models")
            label = f"Gaussian teleport: first {float(teleport):.0%} of the steps analytic"
            return label, steps, GaussianTeleportConfig(stats_path=str(stats), skip_fraction=float(teleport))
    except ValueError as e:
        if isinstance(e, AppError):
            raise
        raise AppError(f"{technique}: {e}") from e
    if technique == FEWER:
        if not 1 <= int(fewer) < steps:
            raise AppError(f"fewer steps must lie in 1..{steps - 1} (below the {steps} sampler steps), got {fewer}")
        return f"fewer steps: {int(fewer)} of {steps}", int(fewer), None
    raise AppError(f"unknown technique {technique!r}; choose one of {DIFF_TECHNIQUES}")


def _fraction(stats: dict[str, Any], config: Any, fast_steps: int, steps: int) -> float:
    """The denoiser FLOPs the accelerated run kept: the technique's own count, else the steps it visited."""
    if config is None:
        return fast_steps / steps
    if stats.get("flops_fraction") is not None:
        return float(stats["flops_fraction"])
    return len(stats.get("visited_steps", range(steps))) / steps


def _psnr(a: Any, b: Any) -> float:
    import numpy as np

    from mmskip.eval import psnr

    def arr(img: Any) -> torch.Tensor:
        return torch.from_numpy(np.asarray(img.convert("L"), dtype="float32") / 255.0)[None, None]

    return psnr(arr(a), arr(b))


def _verdict(technique: bool, faster: bool, same: int, speedup: float, p_fast: float, p_fewer: float) -> str:
    """Does the technique beat plain fewer steps at about the same time? (Nothing to say for fewer steps.)"""
    if not technique:
        return ""
    if not faster:
        return (f"**The technique is not faster than the baseline here** ({speedup:.2f}×): the full {same}-step run "
                "takes no longer and is exact.")
    if p_fast > p_fewer:
        return (f"At about the same time, plain {same} steps give {p_fewer:.1f} dB against the technique's "
                f"{p_fast:.1f} dB: **the technique pays here**.")
    return (f"At about the same time, plain {same} steps give {p_fewer:.1f} dB, as good as or better than the "
            f"technique's {p_fast:.1f} dB: **fewer steps win here**; the technique does not pay on this model.")


@torch.no_grad()
def run_diffusion(model_name: str, digit: int, technique: str, steps: int = 30, every: int = 3, computed: int = 10,
                  granularity: str = "block", teleport: float = 0.3, fewer: int = 10, seed: int | None = 0,
                  pairs: int = DEFAULT_PAIRS, progress: Progress = None) -> tuple[Any, Any, Any, str]:
    """(baseline image, accelerated image, same-time fewer-steps image, markdown stats).

    The technique is timed in ``pairs`` interleaved pairs against the baseline; the "same time"
    step count follows from its median speedup, and that fewer-steps run is timed against the
    same baseline too, so both columns carry a median and a spread."""
    check_pairs(pairs)
    steps = int(steps)
    if steps < 2:
        raise AppError(f"sampler steps must be >= 2, got {steps}")
    if seed is None:
        raise AppError("the seed field is empty: type an integer (the same seed gives the same images)")
    folder, cls = pipeline_folder(model_name)
    label, fast_steps, config = diffusion_setup(technique, steps, every, computed, granularity, teleport, fewer,
                                                model_name)
    stage(progress, 0.02, f"loading the pipeline {folder.name}")
    pipe = _load(folder, cls)
    images: dict[str, Any] = {}
    stats: dict[str, Any] = {}

    def base() -> None:
        images["base"] = _generate(pipe, digit, steps, seed)

    def fast() -> None:
        if config is not None:
            pipe.enable_skip(config)
        try:
            images["fast"] = _generate(pipe, digit, fast_steps, seed)
            if config is not None:
                stats.update(pipe.skip_stats())
        finally:
            if config is not None:
                pipe.disable_skip()

    stage(progress, 0.05, f"warm-up: baseline and {label}")
    base()
    try:  # the warm-up round, which also checks that the technique fits this pipeline and step count
        fast()
    except (TypeError, ValueError) as e:
        raise AppError(f"{label} does not fit {model_name.strip()} at {steps} steps: {e}") from e
    t = timed(base, {label: fast}, pairs, progress, (0.1, 0.55), f"timing {label} against {steps} steps",
              warmup=0)[label]
    same = max(2, round(steps / t.speedup))
    tf = None
    if same < steps:
        def fewer_run() -> None:
            images["fewer"] = _generate(pipe, digit, same, seed)

        tf = timed(base, {"fewer": fewer_run}, pairs, progress, (0.55, 0.95),
                   f"timing {same} steps (the same time) against {steps} steps", warmup=0)["fewer"]
    else:  # not faster than the baseline: the full run itself is the same-time comparison
        same, images["fewer"] = steps, images["base"]
    stage(progress, 0.97, "comparing the images")
    fraction = _fraction(stats, config, fast_steps, steps)
    p_fast, p_fewer = _psnr(images["fast"], images["base"]), _psnr(images["fewer"], images["base"])
    md = "\n".join([
        f"| | baseline ({steps} steps) | {label} | fewer steps, same time ({same} steps) |",
        "|---|---:|---:|---:|",
        f"| seconds (median) | {t.baseline_seconds:.3f} | {t.seconds:.3f} | "
        f"{f'{tf.seconds:.3f}' if tf else 'the baseline'} |",
        f"| speedup (quartiles, pairs) | 1.00× | {speed_cell(t)} | {speed_cell(tf) if tf else '1.00× (the baseline)'} |",
        f"| FLOPs bound (denoiser) | 1.00× | {bound_cell(fraction)} | {bound_cell(same / steps)} |",
        f"| PSNR to baseline | - | {p_fast:.1f} dB | {p_fewer:.1f} dB |",
    ])
    checks = {label: (t, fraction)} | ({f"{same} steps (same time)": (tf, same / steps)} if tf else {})
    parts = [md, _verdict(config is not None, tf is not None, same, t.speedup, p_fast, p_fewer), warnings_md(checks),
             timing_note(t.pairs)]  # the warm-up round ran before the first timing
    return enlarge(images["base"]), enlarge(images["fast"]), enlarge(images["fewer"]), "\n\n".join(p for p in parts if p)
