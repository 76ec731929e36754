"""Evaluate an image pipeline (zoo name or local ``from_pretrained`` folder), optionally with an mmskip config.

Generates the same seeds with and without the config and reports FID (vs the held-out digits),
CLIP score, conditional accuracy, PSNR/SSIM of the accelerated vs the baseline images and time.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from .accuracy import conditional_accuracy
from .clip_score import clip_score
from .fid import fid
from .fidelity import psnr, ssim

__all__ = ["load_pipeline", "generate", "reference_images", "evaluate_class_pipeline", "evaluate_pipeline",
           "pipeline_component"]


def load_pipeline(spec: str) -> Any:
    """A zoo pipeline by name (``digits-dit``, ``digits-sd``) or any diffusers pipeline folder."""
    from mmskip import zoo

    if spec in zoo.NAMES:
        return zoo.load(spec)
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(spec)


def _is_class_conditional(pipe: Any) -> bool:
    return hasattr(pipe, "transformer") and hasattr(pipe, "labels") and not hasattr(pipe, "tokenizer")


def pipeline_component(pipe: Any, name: str = "auto") -> torch.nn.Module:
    """The denoiser an mmskip config attaches to (``transformer`` or ``unet``, or a named component)."""
    if name != "auto":
        return getattr(pipe, name)
    for attr in ("transformer", "unet"):
        if getattr(pipe, attr, None) is not None:
            return getattr(pipe, attr)
    raise ValueError(f"{type(pipe).__name__} has neither a transformer nor a unet; pass component=")


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
    from mmskip.zoo.data import load_split, to_unit

    from ._optional import require

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
                      prompts: list[str] | None = None) -> dict[str, Any]:
    """Baseline vs ``config`` on the same seeds: FID, CLIP score, accuracy, PSNR/SSIM vs baseline, time."""
    from mmskip.zoo.data import caption

    labels = labels_for(n)
    captions = prompts or [caption(c) for c in labels]
    real = reference_images("test")
    clip_model = None
    if clip:
        from .clip_score import load_clip

        clip_model = load_clip(clip)

    def measure(images: torch.Tensor, seconds: float) -> dict[str, float]:
        row = {"seconds": seconds, "fid": fid(real, images), "accuracy": conditional_accuracy(images, labels)}
        if clip_model is not None:
            row["clip_score"] = clip_score(images, captions, clip_model)
        return row

    generate(pipe, labels[:2], 2, guidance_scale, seed)  # warm-up
    t0 = time.perf_counter()
    base = generate(pipe, labels, steps, guidance_scale, seed, prompts=prompts)
    result: dict[str, Any] = {"n": n, "steps": steps, "guidance_scale": guidance_scale,
                              "baseline": measure(base, time.perf_counter() - t0)}
    if config is not None:
        from mmskip.inject import apply

        handle = apply(pipeline_component(pipe, component), config)
        try:
            t0 = time.perf_counter()
            imgs = generate(pipe, labels, steps, guidance_scale, seed, prompts=prompts)
            row = measure(imgs, time.perf_counter() - t0)
            row.update({"psnr_vs_baseline": psnr(imgs, base), "ssim_vs_baseline": ssim(imgs, base),
                        "speedup": result["baseline"]["seconds"] / row["seconds"]})
            result["config"] = config.to_dict()
            result["accelerated"] = row
            result["stats"] = handle.stats()
        finally:
            handle.remove()
    return result
