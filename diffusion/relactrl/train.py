"""Train a Flux control branch (a ``FluxControlNetModel`` or :class:`RelaCtrlFluxNet`) with the base frozen.

The rectified-flow loss of the base model (velocity ``noise − x0`` at logit-normal noise
levels), with the control residuals added to the frozen base transformer; only the branch
learns. AdamW with warm-up and cosine decay, an EMA copy (the one returned), a tqdm bar, and
checkpoints through ``mmskip.train.checkpoint`` so an interrupted run resumes.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

__all__ = ["ControlData", "ControlTrainConfig", "train_control"]

logger = logging.getLogger(__name__)


@dataclass
class ControlData:
    """Training tensors, all on one device.

    ``latents`` (N, c, h, w): the base VAE's scaled latents of the target images;
    ``control_mean`` / ``control_std``: the VAE posterior of the control images (sampled each
    step, as ``FluxControlNetPipeline`` samples it); ``prompt_embeds`` (N, L, D) and
    ``pooled`` (N, P): text embeddings; ``empty_embeds`` / ``empty_pooled`` those of the empty
    prompt (used for a share of the rows so guidance keeps working).
    """

    latents: torch.Tensor
    control_mean: torch.Tensor
    control_std: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    empty_embeds: torch.Tensor
    empty_pooled: torch.Tensor

    def __post_init__(self) -> None:
        n = len(self.latents)
        for name in ("control_mean", "control_std", "prompt_embeds", "pooled"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"ControlData.{name} has {len(getattr(self, name))} rows, latents {n}")


@dataclass(frozen=True)
class ControlTrainConfig:
    """How to train a control branch.

    Args:
        steps: optimizer steps (default 3000).
        batch: rows per step (default 64).
        lr: peak AdamW learning rate (default 5e-4), after ``warmup`` steps (default 100), cosine to 10 %.
        ema: EMA decay of the returned weights (default 0.995).
        drop_text: share of rows trained with the empty prompt (default 0.1).
        checkpoint_every: steps between checkpoints in ``out`` (default 500).
        seed: sampling seed (default 0).
        time_limit_s: stop early (with a warning) once training has run this long (default: no limit).
    """

    steps: int = 3000
    batch: int = 64
    lr: float = 5e-4
    warmup: int = 100
    ema: float = 0.995
    drop_text: float = 0.1
    checkpoint_every: int = 500
    seed: int = 0
    time_limit_s: float | None = None

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1:
            raise ValueError(f"steps and batch must be positive, got {self.steps} and {self.batch}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must lie in [0, 1), got {self.ema}")


def _pack(x: torch.Tensor) -> torch.Tensor:
    """(B, c, h, w) latents -> (B, h/2 · w/2, 4c) tokens, as ``FluxPipeline._pack_latents``."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _ids(h: int, w: int, text_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    img = torch.zeros(h // 2, w // 2, 3, device=device)
    img[..., 1] += torch.arange(h // 2, device=device)[:, None]
    img[..., 2] += torch.arange(w // 2, device=device)[None, :]
    return img.reshape(-1, 3), torch.zeros(text_len, 3, device=device)


def train_control(controlnet: nn.Module, transformer: nn.Module, data: ControlData,
                  config: ControlTrainConfig | None = None, out: str | Path | None = None,
                  desc: str = "control branch") -> nn.Module:
    """Train ``controlnet`` against the frozen ``transformer``; returns its EMA copy (eval mode).

    With ``out``, checkpoints go to ``out/checkpoint`` and a rerun resumes from the last one.
    """
    from mmskip.train.checkpoint import fingerprint, load_checkpoint, save_checkpoint
    from mmskip.train.lr_schedule import warmup_cosine
    from mmskip.zoo.ema import ema_update

    cfg = config or ControlTrainConfig()
    device = data.latents.device
    transformer.requires_grad_(False).eval()
    controlnet.to(device).train()
    ema = copy.deepcopy(controlnet).requires_grad_(False).eval()
    params = [p for p in controlnet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)

    def lr_at(step: int) -> float:
        return warmup_cosine(step, cfg.steps, cfg.warmup, 0.1, decay_after_warmup=True)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    start = 0
    if out is not None:
        got = load_checkpoint(Path(out), fingerprint(controlnet))
        if got is not None:
            state, weights, optim = got
            controlnet.load_state_dict({k: v.to(device) for k, v in weights.items() if not k.startswith("ema.")})
            ema.load_state_dict({k[4:]: v.to(device) for k, v in weights.items() if k.startswith("ema.")})
            opt.load_state_dict(optim)
            sched.load_state_dict(state["scheduler"])
            start = state["step"]
            logger.info("resumed %s from step %d", desc, start)
    g = torch.Generator(device="cpu").manual_seed(cfg.seed + start)
    n, (h, w) = len(data.latents), data.latents.shape[2:]
    img_ids, txt_ids = _ids(h, w, data.prompt_embeds.shape[1], device)
    bar = tqdm(range(start, cfg.steps), desc=desc, initial=start, total=cfg.steps)
    t0, done = time.monotonic(), start
    for step in bar:
        idx = torch.randint(0, n, (cfg.batch,), generator=g).to(device)
        z0 = data.latents[idx]
        ctrl = data.control_mean[idx] + data.control_std[idx] * torch.randn(z0.shape, generator=g).to(device)
        drop = (torch.rand(cfg.batch, generator=g) < cfg.drop_text).to(device)
        seq = torch.where(drop[:, None, None], data.empty_embeds.expand_as(data.prompt_embeds[idx]),
                          data.prompt_embeds[idx])
        pooled = torch.where(drop[:, None], data.empty_pooled.expand_as(data.pooled[idx]), data.pooled[idx])
        s = torch.sigmoid(torch.randn(cfg.batch, generator=g)).to(device)
        noise = torch.randn(z0.shape, generator=g).to(device)
        xt = _pack((1 - s.view(-1, 1, 1, 1)) * z0 + s.view(-1, 1, 1, 1) * noise)
        common = dict(encoder_hidden_states=seq, pooled_projections=pooled, timestep=s, img_ids=img_ids,
                      txt_ids=txt_ids)
        double, single = controlnet(hidden_states=xt, controlnet_cond=_pack(ctrl), return_dict=False, **common)
        pred = transformer(hidden_states=xt, controlnet_block_samples=double, controlnet_single_block_samples=single,
                           return_dict=False, **common)[0]
        loss = F.mse_loss(pred.float(), _pack(noise - z0).float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema_update([ema], [controlnet], step, cfg.ema)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if out is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            weights = {**controlnet.state_dict(), **{f"ema.{k}": v for k, v in ema.state_dict().items()}}
            save_checkpoint(Path(out), done, weights, opt, sched,
                            {"model": fingerprint(controlnet), "config": cfg.__dict__})
        if cfg.time_limit_s is not None and time.monotonic() - t0 > cfg.time_limit_s:
            logger.warning("%s: time limit %.0f s reached after %d of %d steps", desc, cfg.time_limit_s, done,
                           cfg.steps)
            break
    ema.steps_done = done
    controlnet.eval()
    return ema
