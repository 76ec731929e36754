"""Evaluate an image pipeline (zoo name or local ``from_pretrained`` folder), optionally with an mmskip config.

Generates the same seeds with and without the config and reports FID (vs the held-out digits),
CLIP score, conditional accuracy, PSNR/SSIM of the accelerated vs the baseline images and time.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..timing import paired, repeated
from .accuracy import conditional_accuracy
from .clip_score import clip_score
from .fid import fid
from .fidelity import psnr, ssim

__all__ = ["load_pipeline", "generate", "reference_images", "evaluate_class_pipeline", "evaluate_pipeline",
           "pipeline_component", "component_name", "using"]


def load_pipeline(spec: str) -> Any:
    """A zoo pipeline by name (``digits-dit``, ``digits-sd``) or any diffusers pipeline folder;
    anything else raises ``FileNotFoundError`` (``ValueError`` for a zoo model that is no pipeline)
    saying what is accepted."""
    from pathlib import Path

    from mmskip import zoo

    if spec in zoo.NAMES:
        pipe = zoo.load(spec)
        if not hasattr(pipe, "set_progress_bar_config"):
            raise ValueError(f"zoo model {spec!r} is not an image pipeline; pipelines in the zoo: digits-dit, "
                             "digits-sd, scenes-flux")
        return pipe
    if not spec or not spec.strip():
        raise FileNotFoundError("no pipeline given; pass a zoo name (e.g. digits-dit) or a diffusers pipeline folder")
    folder = Path(spec)
    if not folder.is_dir():
        raise FileNotFoundError(f"{spec!r} is neither a zoo name ({', '.join(zoo.NAMES)}) nor an existing folder; "
                                "pass a zoo name or a diffusers pipeline folder (with model_index.json)")
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{spec} has no model_index.json, so it is not a diffusers pipeline folder; pass a "
                                "folder written by pipeline.save_pretrained or a zoo name")
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(spec)


def _is_class_conditional(pipe: Any) -> bool:
    return hasattr(pipe, "transformer") and hasattr(pipe, "labels") and not hasattr(pipe, "tokenizer")


def component_name(pipe: Any, name: str = "auto") -> str:
    """The name of the denoiser an mmskip config attaches to: ``transformer`` or ``unet``, or
    ``name`` when it names a module of the pipeline (else ``ValueError`` listing them)."""
    modules = [k for k, v in vars(pipe).items() if isinstance(v, torch.nn.Module)]
    if name != "auto":
        if name not in modules:
            raise ValueError(f"{type(pipe).__name__} has no component {name!r}; its modules: {', '.join(modules)}")
        return name
    for attr in ("transformer", "unet"):
        if attr in modules:
            return attr
    raise ValueError(f"{type(pipe).__name__} has neither a transformer nor a unet; name the denoiser with "
                     f"component= (its modules: {', '.join(modules)})")


def pipeline_component(pipe: Any, name: str = "auto") -> torch.nn.Module:
    """The denoiser an mmskip config attaches to (``transformer`` or ``unet``, or a named component)."""
    return getattr(pipe, component_name(pipe, name))


@contextmanager
def using(pipe: Any, name: str, module: torch.nn.Module) -> Iterator[Any]:
    """``pipe`` with its component ``name`` replaced by ``module`` for the duration (restored after)."""
    plain = getattr(pipe, name)
    setattr(pipe, name, module)
    try:
        yield pipe
    finally:
        setattr(pipe, name, plain)


def labels_for(n: int) -> list[int]:
    return [i % 10 for i in range(n)]


@torch.no_grad()
def generate(pipe: Any, labels: list[int], steps: int = 50, guidance_scale: float = 4.0, seed: int = 0,
             batch_size: int = 100, prompts: list[str] | None = None) -> torch.Tensor:
    """Images (N, C, H, W) in [0, 1] for ``labels`` (class pipelines) or ``prompts`` (text pipelines).

    Each batch uses its own generator seeded ``seed + batch index``, so runs are comparable.
    """
    pipe.set_progress_bar_config(disable=True)
    out = []
    for b, i in enumerate(range(0, len(labels), batch_size)):
        g = torch.Generator().manual_seed(seed + b)
        if _is_class_conditional(pipe):
            res = pipe(class_labels=labels[i:i + batch_size], num_inference_steps=steps, guidance_scale=guidance_scale,
                       generator=g, output_type="pt")
        else:
            from mmskip.zoo.data import caption

            ps = prompts[i:i + batch_size] if prompts else [caption(c) for c in labels[i:i + batch_size]]
            res = pipe(prompt=ps, num_inference_steps=steps, guidance_scale=guidance_scale, generator=g,
                       output_type="pt")
        imgs = res.images
        imgs = imgs if torch.is_tensor(imgs) else torch.as_tensor(imgs).permute(0, 3, 1, 2)
        out.append(imgs.float().cpu())
    return torch.cat(out)


def reference_images(split: str = "test") -> torch.Tensor:
    """The held-out digits (N, 1, 32, 32) in [0, 1]: FID's real set."""
    from mmskip.optional_deps import require
    from mmskip.zoo.data import load_split, to_unit

    require("sklearn.datasets", "the digits reference set (mmskip.zoo.data)")
    return to_unit(load_split(split)[0])


def evaluate_class_pipeline(pipe: Any, n: int = 500, steps: int = 50, guidance_scale: float = 4.0,
                            seed: int = 0) -> dict[str, float]:
    """Conditional accuracy and FID of a digits pipeline's samples (used by the zoo recipes)."""
    labels = labels_for(n)
    t0 = time.perf_counter()
    imgs = generate(pipe, labels, steps, guidance_scale, seed)
    dt = time.perf_counter() - t0
    real = reference_images("test")
    return {"accuracy": conditional_accuracy(imgs, labels), "fid": fid(real, imgs),
            "fid_real_floor": fid(real, reference_images("train")), "seconds": dt}


def evaluate_pipeline(pipe: Any, n: int = 500, steps: int = 50, guidance_scale: float = 4.0, seed: int = 0,
                      config: Any = None, component: str = "auto", clip: str | None = "digits-clip",
                      prompts: list[str] | None = None, repeats: int = 5, time_images: int = 20) -> dict[str, Any]:
    """Baseline vs ``config`` on the same seeds: FID, CLIP score, accuracy, PSNR/SSIM vs baseline, time.

    The config is applied once, to a copy of the denoiser (it takes the denoiser's memory a second
    time), so what the technique measures or learns on its first call (feature inheritance counts
    the FLOPs of one call) is not timed. The first, untimed generation of all ``n`` images gives
    the quality metrics and ``result["stats"]`` (with the FLOPs fraction); then
    :func:`mmskip.timing.paired` times ``time_images`` images on the pipeline with its own and with
    the copied denoiser in ``repeats`` interleaved pairs after one warm-up pair. ``speedup`` is
    the median ratio; ``result["timing"]`` has its quartiles, the FLOPs bound and the bound warning.
    """
    from mmskip.zoo.data import caption

    labels = labels_for(n)
    captions = prompts or [caption(c) for c in labels]
    real = reference_images("test")
    clip_model = None
    if clip:
        from .clip_score import load_clip

        clip_model = load_clip(clip)

    def measure(images: torch.Tensor) -> dict[str, float]:
        row = {"fid": fid(real, images), "accuracy": conditional_accuracy(images, labels)}
        if clip_model is not None:
            row["clip_score"] = clip_score(images, captions, clip_model)
        return row

    timed = labels[:time_images]
    timed_prompts = prompts[:time_images] if prompts else None

    def run_base() -> Any:
        return generate(pipe, timed, steps, guidance_scale, seed, prompts=timed_prompts)

    base = generate(pipe, labels, steps, guidance_scale, seed, prompts=prompts)  # untimed: the reference images
    result: dict[str, Any] = {"n": n, "steps": steps, "guidance_scale": guidance_scale, "baseline": measure(base)}
    if config is None:
        secs = statistics.median(repeated(run_base, repeats, warmup=1))
        result["baseline"]["seconds"] = secs
        result["timing"] = {"repeats": repeats, "warmup": 1, "timed_images": len(timed)}
        return result
    from mmskip.inject import apply

    name = component_name(pipe, component)
    fast = copy.deepcopy(getattr(pipe, name))
    handle = apply(fast, config)
    try:
        with using(pipe, name, fast):
            imgs = generate(pipe, labels, steps, guidance_scale, seed, prompts=prompts)  # untimed: quality, FLOPs
        stats = handle.stats()

        def run_fast() -> Any:
            with using(pipe, name, fast):
                return generate(pipe, timed, steps, guidance_scale, seed, prompts=timed_prompts)

        t = paired(run_base, {"accelerated": run_fast}, repeats=repeats, warmup=1)["accelerated"]
    finally:
        handle.remove()
    fraction = stats.get("flops_fraction")
    result["baseline"]["seconds"] = t.baseline_seconds
    row = measure(imgs)
    row.update({"seconds": t.seconds, "psnr_vs_baseline": psnr(imgs, base), "ssim_vs_baseline": ssim(imgs, base),
                "speedup": t.speedup, "flops_bound": 1 / fraction if fraction else None})
    result["config"] = config.to_dict()
    result["accelerated"] = row
    result["timing"] = {**t.to_dict(fraction), "repeats": repeats, "warmup": 1, "timed_images": len(timed)}
    result["stats"] = stats
    return result
