"""The attention-backend rows of ``gpu_campaign.py``'s diffusion section (issue 33): the Skip pipelines under
xformers and diffusers' attention backends.

For each zoo pipeline (``digits-dit``: diffusers' ``Attention`` with ``AttnProcessor2_0``; ``scenes-flux``:
``FluxAttnProcessor``, which dispatches through ``diffusers.models.attention_dispatch``) and each backend:
the parent pipeline and its Skip pipeline (``from_pipe``: the same denoiser, so the same backend) generate
the same images from the same seed. Two checks per backend:

* **skipping off**: the Skip pipeline's images equal the parent's at that backend (``torch.equal``);
* **skipping on** (feature inheritance every 2 steps): its images against the same config under the default
  backend: largest absolute difference (images in [0, 1]) and whether it is within ``BF16_ATOL``; beside
  it, the parent's own difference between the two backends (what the kernel change alone does).

Backends: ``xformers`` through ``enable_xformers_memory_efficient_attention()`` (a row saying "xformers not
installed" when it is not importable), and every backend of diffusers' ``AttentionBackendName`` whose
requirements are met here (``set_attention_backend``; hub-kernel backends, which download, are left out).
A denoiser whose processors call SDPA directly never reaches diffusers' backends: its row says so instead
of reporting a check that changed nothing. Off CUDA only the default backend and the CPU-capable native
backends run; the rest say "skipped: CUDA only".
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from _campaign_rows import Context

__all__ = ["BF16_ATOL", "backends", "run"]

BF16_ATOL = 0.05  # images in [0, 1]: a few bf16 ulps of the latents, carried through the VAE and the steps
CPU_BACKENDS = ("native", "_native_math")  # run off CUDA too
STEPS = 6
LABELS = [3, 7]
PROMPTS = ["two red circles left of a blue square", "a yellow triangle above a green square"]


def backends() -> list[str]:
    """Diffusers' attention backends, by name, that download nothing (xformers first: the issue's)."""
    try:
        from diffusers.models.attention_dispatch import AttentionBackendName
    except ImportError:
        return []
    names = [b.value for b in AttentionBackendName if "hub" not in b.value]
    return sorted(names, key=lambda n: (n != "xformers", n not in CPU_BACKENDS, n))


def _dispatches(denoiser: torch.nn.Module) -> tuple[bool, str]:
    """Whether the denoiser's attention processors call diffusers' ``dispatch_attention_fn`` (so a backend set with
    ``set_attention_backend`` reaches them), and their class names."""
    procs = {type(m.processor) for m in denoiser.modules() if hasattr(m, "processor") and m.processor is not None}
    names = ", ".join(sorted(p.__name__ for p in procs)) or "none"
    return bool(procs) and all("dispatch_attention_fn" in inspect.getsource(p) for p in procs), names


def _available(name: str) -> str | None:
    """Why backend ``name`` cannot run here, or ``None``."""
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _check_attention_backend_requirements,
    )

    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except Exception as err:  # diffusers raises RuntimeError / ImportError naming what is missing
        return f"{type(err).__name__}: {str(err)[:160]}"
    return None


def _pipelines(ctx: Context, zoo_name: str) -> tuple[Any, Any]:
    """The zoo pipeline on the device and its Skip pipeline (``from_pipe``: shared components)."""
    import mmskip.pipelines as skip_pipelines

    from mmskip import zoo

    parent = zoo.load(zoo_name).to(ctx.device, ctx.dtype)
    parent.set_progress_bar_config(disable=True)
    skip = getattr(skip_pipelines, "Skip" + type(parent).__name__).from_pipe(parent)
    skip.set_progress_bar_config(disable=True)
    return parent, skip


def _images(pipe: Any) -> torch.Tensor:
    """Images in [0, 1] from a fixed seed: class labels (DiT) or prompts at the zoo's sampling settings (Flux)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if "class_labels" in inspect.signature(type(pipe).__call__).parameters:
            out = pipe(class_labels=LABELS, num_inference_steps=STEPS, guidance_scale=4.0, generator=g, output_type="pt")
        else:
            from mmskip.zoo.scenes_data import SAMPLING

            out = pipe(PROMPTS, negative_prompt=[""] * len(PROMPTS), num_inference_steps=STEPS, generator=g,
                       output_type="pt", **SAMPLING)
    return out.images.float().cpu()


def _denoiser(pipe: Any) -> torch.nn.Module:
    return getattr(pipe, "transformer", None) or pipe.unet


def _set(parent: Any, name: str) -> Callable[[], None]:
    """Put ``parent``'s denoiser on backend ``name``; the function that puts it back on the default."""
    if name == "xformers (enable_xformers_memory_efficient_attention)":
        parent.enable_xformers_memory_efficient_attention()
        return parent.disable_xformers_memory_efficient_attention
    den = _denoiser(parent)
    den.set_attention_backend(name)
    return den.reset_attention_backend


def _checks(ctx: Context, parent: Any, skip: Any, config: Any, ref: dict[str, torch.Tensor], name: str
            ) -> dict[str, Any]:
    """Both checks at backend ``name`` (``ref``: the parent and skipping-on images at the default backend)."""
    reset = _set(parent, name)
    try:
        skip.disable_skip()
        base, off = _images(parent), _images(skip)
        skip.enable_skip(config)
        on = _images(skip)
    finally:
        skip.disable_skip()
        reset()
    diff = float((on - ref["on"]).abs().max())
    return {"skip_off_equals_parent": bool(torch.equal(off, base)), "skip_on_max_abs_diff_vs_default": diff,
            "skip_on_within_bf16_tol": diff <= BF16_ATOL, "bf16_atol": BF16_ATOL,
            "parent_max_abs_diff_vs_default": float((base - ref["parent"]).abs().max()),
            "note": f"{STEPS} steps, 2 images in [0, 1]"}


def _model_rows(ctx: Context, zoo_name: str) -> None:
    from mmskip.diffusion import FeatureInheritanceConfig

    from mmskip.schedules import interval

    model = f"{zoo_name} (attention backends)"
    held: dict[str, Any] = {}

    def build() -> dict[str, Any]:
        held["parent"], held["skip"] = _pipelines(ctx, zoo_name)
        dispatches, procs = _dispatches(_denoiser(held["parent"]))
        held["dispatches"] = dispatches
        return {"processors": procs, "dispatches_to_backends": dispatches, "note": type(held["skip"]).__name__}

    ctx.attempt(model, "attention backend (build)", 1, "eager", build, need_s=10.0)
    if "skip" not in held:
        return
    parent, skip = held["parent"], held["skip"]
    config = FeatureInheritanceConfig(schedule=interval(2), measure_flops=False)
    ref: dict[str, torch.Tensor] = {}

    def default() -> dict[str, Any]:
        skip.disable_skip()
        ref["parent"], off = _images(parent), _images(skip)
        skip.enable_skip(config)
        try:
            ref["on"] = _images(skip)
        finally:
            skip.disable_skip()
        return {"skip_off_equals_parent": bool(torch.equal(off, ref["parent"])), "note": f"{STEPS} steps, 2 images"}

    ctx.attempt(model, "attention backend default", 1, "eager", default, need_s=5.0)
    if "on" not in ref:
        return
    cuda = ctx.device.type == "cuda"
    xf = "xformers (enable_xformers_memory_efficient_attention)"
    try:
        import xformers  # noqa: F401

        have_xformers = True
    except ImportError:
        have_xformers = False
    if not have_xformers:
        ctx.row(model, f"attention backend {xf}", 1, "eager", skipped="xformers not installed")
    elif not cuda:
        ctx.row(model, f"attention backend {xf}", 1, "eager", skipped="CUDA only")
    else:
        ctx.attempt(model, f"attention backend {xf}", 1, "eager", lambda: _checks(ctx, parent, skip, config, ref, xf),
                    need_s=5.0)
    if not held["dispatches"]:
        ctx.row(model, "attention backend (diffusers' set_attention_backend)", 1, "eager",
                skipped="its attention processors call SDPA directly: diffusers' attention backends do not reach them")
    else:
        names = [n for n in backends() if cuda or n in CPU_BACKENDS]
        if not cuda:
            rest = [n for n in backends() if n not in names]
            ctx.row(model, "attention backend (the others)", 1, "eager", skipped="CUDA only: " + ", ".join(rest))
        for name in names:
            tech = f"attention backend {name}"
            why = _available(name)
            if why:
                ctx.row(model, tech, 1, "eager", skipped=why)
                continue
            ctx.attempt(model, tech, 1, "eager", lambda n=name: _checks(ctx, parent, skip, config, ref, n), need_s=5.0)
    held.clear()


def run(ctx: Context) -> None:
    """The rows for every pipeline of ``--attention-models``."""
    for zoo_name in [m for m in ctx.args.attention_models.split(",") if m]:
        _model_rows(ctx, zoo_name)
        if ctx.device.type == "cuda":  # the pipeline is gone with _model_rows' frame
            torch.cuda.empty_cache()
