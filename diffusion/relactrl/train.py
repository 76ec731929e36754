"""Train a Flux control branch (a ``FluxControlNetModel`` or :class:`RelaCtrlFluxNet`) with the base frozen.

The rectified-flow loss of the base model (velocity ``noise − x0`` at logit-normal noise
levels), with the control residuals added to the frozen base transformer; only the branch
learns. One task of the project's training loop (:func:`mmskip.train.fit`): AdamW with warm-up and
cosine decay, an EMA copy (the one returned), the progress bar and resumable checkpoints are the loop's.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmskip.train import TrainTask
from mmskip.train.checkpoint import fingerprint
from mmskip.train.loop import named_weights

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


class _ControlTask(TrainTask):
    """The rectified-flow loss of the frozen base with the branch's residuals added; only the branch learns."""

    def __init__(self, controlnet: nn.Module, transformer: nn.Module, data: ControlData, cfg: ControlTrainConfig,
                 desc: str) -> None:
        self.controlnet, self.transformer, self.data, self.cfg, self.desc = controlnet, transformer, data, cfg, desc
        self.device = data.latents.device
        h, w = data.latents.shape[2:]
        self.img_ids, self.txt_ids = _ids(h, w, data.prompt_embeds.shape[1], self.device)

    def prepare(self, accelerator: Any) -> None:
        self.transformer.requires_grad_(False).eval()
        self.controlnet.to(self.device).train()

    def weights(self) -> dict[str, torch.Tensor]:
        return named_weights(self.controlnet)

    def fingerprint(self) -> dict[str, Any]:
        return fingerprint(self.controlnet)

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        cfg, data, device = self.cfg, self.data, self.device
        g = torch.Generator(device="cpu").manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(0, len(data.latents), (cfg.batch,), generator=g).to(device)
        z0 = data.latents[idx]
        ctrl = data.control_mean[idx] + data.control_std[idx] * torch.randn(z0.shape, generator=g).to(device)
        drop = (torch.rand(cfg.batch, generator=g) < cfg.drop_text).to(device)
        seq = torch.where(drop[:, None, None], data.empty_embeds.expand_as(data.prompt_embeds[idx]),
                          data.prompt_embeds[idx])
        pooled = torch.where(drop[:, None], data.empty_pooled.expand_as(data.pooled[idx]), data.pooled[idx])
        s = torch.sigmoid(torch.randn(cfg.batch, generator=g)).to(device)
        noise = torch.randn(z0.shape, generator=g).to(device)
        return {"z0": z0, "ctrl": ctrl, "seq": seq, "pooled": pooled, "s": s, "noise": noise}

    def loss(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        z0, s, noise = batch["z0"], batch["s"], batch["noise"]
        xt = _pack((1 - s.view(-1, 1, 1, 1)) * z0 + s.view(-1, 1, 1, 1) * noise)
        common = dict(encoder_hidden_states=batch["seq"], pooled_projections=batch["pooled"], timestep=s,
                      img_ids=self.img_ids, txt_ids=self.txt_ids)
        double, single = self.controlnet(hidden_states=xt, controlnet_cond=_pack(batch["ctrl"]), return_dict=False,
                                         **common)
        pred = self.transformer(hidden_states=xt, controlnet_block_samples=double,
                                controlnet_single_block_samples=single, return_dict=False, **common)[0]
        return {"mse": F.mse_loss(pred.float(), _pack(noise - z0).float())}


def train_control(controlnet: nn.Module, transformer: nn.Module, data: ControlData,
                  config: ControlTrainConfig | None = None, out: str | Path | None = None,
                  desc: str = "control branch") -> nn.Module:
    """Train ``controlnet`` against the frozen ``transformer``; returns its EMA copy (eval mode).

    One :class:`~mmskip.train.TrainTask` of :func:`mmskip.train.fit` (AdamW, warm-up then cosine to
    10 %, clipping at 1, the EMA with its decay warm-up, the time limit). With ``out``, checkpoints go
    to ``out/checkpoint`` and a rerun resumes from the last one (each step's draws are seeded by the
    step, so a resumed run trains as an uninterrupted one). The returned copy has ``steps_done``.
    """
    from mmskip.train import TrainConfig, fit

    cfg = config or ControlTrainConfig()
    task = _ControlTask(controlnet, transformer, data, cfg, desc)
    train_cfg = TrainConfig(steps=cfg.steps, batch_size=cfg.batch, lr=cfg.lr, warmup=cfg.warmup,
                            lr_schedule="cosine_after_warmup", min_lr_ratio=0.1, weight_decay=0.0,
                            betas=(0.9, 0.999), max_grad_norm=1.0, ema=cfg.ema, ema_warmup=True,
                            save_every=cfg.checkpoint_every, log_every=20, seed=cfg.seed,
                            cpu=data.latents.device.type == "cpu", time_limit_s=cfg.time_limit_s)
    result = fit(task, train_cfg, out=out, resume=out is not None, meta={"control_config": cfg.__dict__})
    ema = copy.deepcopy(controlnet).requires_grad_(False).eval()
    if result.ema is not None:
        with torch.no_grad():
            params = dict(ema.named_parameters())
            for k, v in result.ema.items():
                params[k].copy_(v.to(params[k].device, params[k].dtype))
    ema.steps_done = result.steps
    controlnet.eval()
    return ema
