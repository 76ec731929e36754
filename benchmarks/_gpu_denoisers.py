"""The denoisers ``diffusion_gpu.py`` measures, at real shapes with random weights, and their sampling loops.

``sd15`` (SD 1.5's UNet, DDIM), ``flux`` (Flux-dev's width, fewer blocks) and ``wan`` (Wan 2.1 1.3B's
width, fewer blocks), both flow-matching Euler. Each builder returns a :class:`Bench`: the model, its
latent shape and ``step(x, i)``, and the regions that regional compilation compiles.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
)


class Skipped(Exception):
    """The method does not apply to this model (a ``skipped`` row, not an error)."""


@dataclass
class Bench:
    """One denoiser at one shape and its sampling loop: ``step(x, i)`` is the next latent (float32)."""

    name: str
    model: torch.nn.Module
    dtype: torch.dtype
    latent: tuple[int, ...]
    steps: int
    step: Callable[[torch.Tensor, int], torch.Tensor]
    regions: list[torch.nn.Module]  # what regional compilation compiles
    shape: str
    extra: dict[str, Any] = field(default_factory=dict)


def _call(model: torch.nn.Module, **kw: Any) -> torch.Tensor:
    ctx = model.cache_context("cond") if hasattr(model, "cache_context") else contextlib.nullcontext()
    with ctx:
        return model(**kw, return_dict=False)[0].float()


def _randn(*shape: int, seed: int, dev: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dev, dtype)


def build_sd15(dev: torch.device, smoke: bool, steps: int, args: argparse.Namespace) -> Bench:
    from _test_denoisers import tiny_unet
    from diffusers import DDIMScheduler, UNet2DConditionModel

    dtype = torch.float32 if smoke else torch.float16
    hw, txt = (8, (5, 16)) if smoke else (64, (77, 768))
    with torch.device(dev):
        model = tiny_unet(cross_attention_dim=16) if smoke else UNet2DConditionModel(**SD15)
    model = model.to(dev, dtype).eval()
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(steps)
    ctx = _randn(2, *txt, seed=1, dev=dev, dtype=dtype)

    def step(x: torch.Tensor, i: int) -> torch.Tensor:
        t = sched.timesteps[i]
        eps = _call(model, sample=torch.cat([x, x]).to(dtype), timestep=t, encoder_hidden_states=ctx)
        u, c = eps.chunk(2)
        return sched.step(u + 7.5 * (c - u), t, x).prev_sample

    return Bench("sd15", model, dtype, (1, 4, hw, hw), steps, step,
                 [*model.down_blocks, model.mid_block, *model.up_blocks],
                 f"UNet latents (1,4,{hw},{hw}) x2 for CFG, text (2,{txt[0]},{txt[1]}), DDIM")


def _flow(steps: int, shift: float = 3.0) -> list[float]:
    s = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    return (shift * s / (1 + (shift - 1) * s)).tolist() + [0.0]


def build_flux(dev: torch.device, smoke: bool, steps: int, args: argparse.Namespace) -> Bench:
    from diffusers import FluxTransformer2DModel

    dtype, sig = (torch.float32 if smoke else torch.bfloat16), _flow(steps)
    if smoke:
        cfg = dict(in_channels=4, num_layers=2, num_single_layers=3, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                   axes_dims_rope=(4, 6, 6))
        side, n_txt = 4, 8
    else:
        cfg = dict(in_channels=64, num_layers=args.flux_layers[0], num_single_layers=args.flux_layers[1],
                   attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                   pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
        side, n_txt = 64, 512
    with torch.device(dev):
        model = FluxTransformer2DModel(guidance_embeds=True, **cfg).to(dtype).eval()
    ids = torch.zeros(side, side, 3, device=dev)
    ids[..., 1] = torch.arange(side, device=dev)[:, None]
    ids[..., 2] = torch.arange(side, device=dev)[None]
    text = _randn(1, n_txt, cfg["joint_attention_dim"], seed=1, dev=dev, dtype=dtype)
    fixed = dict(encoder_hidden_states=text,
                 pooled_projections=_randn(1, cfg["pooled_projection_dim"], seed=2, dev=dev, dtype=dtype),
                 img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(n_txt, 3, device=dev),
                 guidance=torch.full((1,), 3.5, device=dev))

    def step(x: torch.Tensor, i: int) -> torch.Tensor:  # the pipeline passes t / 1000 = sigma
        v = _call(model, hidden_states=x.to(dtype), timestep=torch.full((1,), sig[i], device=dev), **fixed)
        return x + (sig[i + 1] - sig[i]) * v

    return Bench("flux", model, dtype, (1, side * side, cfg["in_channels"]), steps, step,
                 [*model.transformer_blocks, *model.single_transformer_blocks],
                 f"Flux {cfg['num_layers']}+{cfg['num_single_layers']} blocks, {side * side} image + "
                 f"{n_txt} text tokens, guidance 3.5, flow Euler shift 3")


def build_wan(dev: torch.device, smoke: bool, steps: int, args: argparse.Namespace) -> Bench:
    from diffusers import WanTransformer3DModel

    dtype, sig = (torch.float32 if smoke else torch.bfloat16), _flow(steps)
    if smoke:
        cfg = dict(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
                   freq_dim=32, ffn_dim=32, num_layers=4, rope_max_seq_len=32)
        lat, n_txt = (1, 4, 2, 8, 8), 7
    else:
        cfg = dict(num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                   text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=args.wan_layers)
        lat, n_txt = (1, 16, args.wan_frames, 60, 104), 512
    with torch.device(dev):
        model = WanTransformer3DModel(patch_size=(1, 2, 2), **cfg).to(dtype).eval()
    text = _randn(1, n_txt, cfg["text_dim"], seed=1, dev=dev, dtype=dtype)

    def step(x: torch.Tensor, i: int) -> torch.Tensor:
        t = torch.full((1,), 1000.0 * sig[i], device=dev)
        v = _call(model, hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=text)
        return x + (sig[i + 1] - sig[i]) * v

    tokens = lat[2] * (lat[3] // 2) * (lat[4] // 2)
    return Bench("wan", model, dtype, lat, steps, step, list(model.blocks),
                 f"Wan {cfg['num_layers']} blocks, latents {lat} = {tokens} tokens, {n_txt} text tokens, "
                 "no CFG, flow Euler shift 3")


BUILDERS = {"sd15": (build_sd15, 50), "flux": (build_flux, 28), "wan": (build_wan, 28)}
