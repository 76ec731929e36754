"""Distil an assembled UNet from its teacher: output-level and feature-level losses (A-SDM, BK-SDM).

The student learns the teacher's noise prediction (output KD) and the outputs of every block the
two share by name (feature KD: ``down_blocks.i``, ``mid_block`` if kept, ``up_blocks.j``), plus
the ordinary denoising loss on the data (task loss), the three terms of BK-SDM's recipe that
A-SDM's model assembly also distils with. Added here (``guidance_weight``): a loss on the
guidance direction (conditional minus unconditional prediction). On the zoo's digits-sd the
three terms alone left the assembled UNet at 0.36 prompt accuracy (teacher 0.975) although its
output KD loss was 0.1 % of the target's: the conditional part is a tiny share of the noise
prediction, and CFG multiplies exactly that part. Training is one task of the project's loop
(:func:`mmskip.train.fit`: AdamW, schedule, clipping, EMA, progress bar); its checkpoints are
written every ``checkpoint_every`` steps into ``out`` and a rerun resumes from them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmskip.train import TrainTask
from mmskip.train.checkpoint import fingerprint
from mmskip.train.loop import named_weights

__all__ = ["DistillConfig", "distill", "shared_features"]

logger = logging.getLogger(__name__)

_NOISE_SEED = 1_000_003  # seeds each step's noise and timesteps (plus the step), apart from callers' seeds


@dataclass(frozen=True)
class DistillConfig:
    """Distillation settings.

    Args:
        steps: optimizer steps (default 1000).
        lr: AdamW learning rate (default 2e-4), cosine-decayed to 10 % after 5 % warm-up.
        task_weight / output_weight / feature_weight: weights of the denoising loss, the
            output-KD loss and the summed feature-KD losses (defaults 1, 1, 1; BK-SDM's choice).
        guidance_weight: weight of a guidance-direction loss, ``||(s_c - s_u) - (t_c - t_u)||^2``
            between the conditional and unconditional predictions of student and teacher (default
            0: off; needs ``uncond`` in :func:`distill`). Classifier-free guidance multiplies this
            small difference, so an error in it costs far more than its share of the output loss.
        ema: EMA decay of the student weights that are returned (default 0.99; 0 = no EMA).
        checkpoint_every: steps between checkpoints in ``out`` (default 200).
    """

    steps: int = 1000
    lr: float = 2e-4
    task_weight: float = 1.0
    output_weight: float = 1.0
    feature_weight: float = 1.0
    guidance_weight: float = 0.0
    ema: float = 0.99
    checkpoint_every: int = 200

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if min(self.task_weight, self.output_weight, self.feature_weight, self.guidance_weight) < 0:
            raise ValueError("loss weights must be >= 0")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must lie in [0, 1), got {self.ema}")


def shared_features(teacher: nn.Module, student: nn.Module) -> list[str]:
    """Block outputs both UNets have (by name): what feature KD matches."""
    names = [f"down_blocks.{i}" for i in range(len(student.down_blocks))]
    if student.mid_block is not None and teacher.mid_block is not None:
        names.append("mid_block")
    names += [f"up_blocks.{j}" for j in range(len(student.up_blocks))]
    return names


@contextmanager
def _capture(model: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    feats: dict[str, torch.Tensor] = {}
    handles = []
    for n in names:
        def hook(mod: nn.Module, args: Any, out: Any, n: str = n) -> None:
            feats[n] = out[0] if isinstance(out, tuple) else out

        handles.append(model.get_submodule(n).register_forward_hook(hook))
    try:
        yield feats
    finally:
        for h in handles:
            h.remove()


class _DistillTask(TrainTask):
    """Task, output-KD, feature-KD (and guidance) losses of the student against the frozen teacher."""

    def __init__(self, student: nn.Module, teacher: nn.Module,
                 batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]], noise_scheduler: Any,
                 cfg: DistillConfig, desc: str, uncond: torch.Tensor | None) -> None:
        self.student, self.teacher, self.batches, self.noise_scheduler = student, teacher, batches, noise_scheduler
        self.cfg, self.desc, self.uncond = cfg, desc, uncond
        self.names = shared_features(teacher, student)
        self.pred_type = getattr(noise_scheduler.config, "prediction_type", "epsilon")
        self.history: list[dict[str, float]] = []
        self.last: dict[str, torch.Tensor] = {}
        self.t0 = time.perf_counter()

    def prepare(self, accelerator: Any) -> None:
        self.teacher.eval().requires_grad_(False)
        self.student.train().requires_grad_(True)
        self.t0 = time.perf_counter()

    def weights(self) -> dict[str, torch.Tensor]:
        return named_weights(self.student)

    def fingerprint(self) -> dict[str, Any]:
        return fingerprint(self.student)

    def state(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("history", []))

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        latents, context = self.batches(step)
        g = torch.Generator(device=latents.device).manual_seed(_NOISE_SEED + step)
        noise = torch.randn(latents.shape, generator=g, device=latents.device, dtype=latents.dtype)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=g,
                          device=latents.device)
        return {"latents": latents, "context": context, "noise": noise, "t": t}

    def loss(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        cfg, names, sched = self.cfg, self.names, self.noise_scheduler
        latents, context, noise, t = batch["latents"], batch["context"], batch["noise"], batch["t"]
        noisy = sched.add_noise(latents, noise, t)
        target = noise if self.pred_type == "epsilon" else sched.get_velocity(latents, noise, t)
        n = latents.shape[0]
        if cfg.guidance_weight:  # the same noisy inputs, also with the empty prompt
            noisy, t = torch.cat([noisy, noisy]), torch.cat([t, t])
            context = torch.cat([context, self.uncond.to(context).expand(n, *self.uncond.shape[-2:])])
        with torch.no_grad(), _capture(self.teacher, names) as tf:
            t_out = self.teacher(noisy, t, context).sample
        with _capture(self.student, names) as sf:
            s_out = self.student(noisy, t, context).sample
        task = F.mse_loss(s_out[:n], target)
        out_kd = F.mse_loss(s_out, t_out)
        feat_kd = sum(F.mse_loss(sf[k], tf[k]) for k in names)
        terms = {"task": cfg.task_weight * task, "output_kd": cfg.output_weight * out_kd,
                 "feature_kd": cfg.feature_weight * feat_kd}
        guide = torch.zeros(())
        if cfg.guidance_weight:
            guide = F.mse_loss(s_out[:n] - s_out[n:], t_out[:n] - t_out[n:])
            terms["guidance_kd"] = cfg.guidance_weight * guide
        self.last = {"loss": sum(terms.values()).detach(), "task": task.detach(), "output_kd": out_kd.detach(),
                     "feature_kd": feat_kd.detach(), "guidance_kd": guide.detach()}
        return terms

    def after_step(self, step: int) -> None:
        if step % 50 == 0 or step == self.cfg.steps - 1:
            self.history.append({"step": step, **{k: float(v) for k, v in self.last.items()},
                                 "seconds": time.perf_counter() - self.t0})


def distill(student: nn.Module, teacher: nn.Module, batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
            noise_scheduler: Any, config: DistillConfig | None = None, out: Path | None = None,
            desc: str = "distil", uncond: torch.Tensor | None = None) -> list[dict[str, float]]:
    """Train ``student`` toward ``teacher`` in place; returns the loss history (every 50 steps).

    ``batches(step)`` gives ``(latents, context)`` for a step (clean latents, already scaled by
    the VAE's scaling factor; text encoder hidden states). ``noise_scheduler`` is a diffusers
    training scheduler (``add_noise``, ``config.num_train_timesteps``, epsilon or v prediction).
    ``uncond``: the empty prompt's hidden states (one ``(tokens, dim)`` tensor), for the guidance loss.
    One :class:`~mmskip.train.TrainTask` of :func:`mmskip.train.fit`; the noise and timesteps of a
    step are drawn from a generator seeded by the step, so a resumed run trains as an uninterrupted one.
    """
    from mmskip.train import TrainConfig, fit

    cfg = config or DistillConfig()
    if cfg.guidance_weight and uncond is None:
        raise ValueError("guidance_weight > 0 needs uncond= (the empty prompt's text encoder hidden states)")
    task = _DistillTask(student, teacher, batches, noise_scheduler, cfg, desc, uncond)
    device = next(student.parameters()).device
    train_cfg = TrainConfig(steps=cfg.steps, lr=cfg.lr, warmup=max(1, cfg.steps // 20),
                            lr_schedule="cosine_after_warmup", min_lr_ratio=0.1, weight_decay=0.0,
                            betas=(0.9, 0.999), max_grad_norm=1.0, ema=cfg.ema, ema_warmup=False,
                            save_every=cfg.checkpoint_every, log_every=50, cpu=device.type == "cpu")
    result = fit(task, train_cfg, out=out, resume=out is not None)
    if result.ema is not None:
        with torch.no_grad():
            params = dict(student.named_parameters())
            for k, v in result.ema.items():
                params[k].copy_(v.to(params[k].device, params[k].dtype))
    student.eval().requires_grad_(False)
    return task.history
