"""Distil an assembled UNet from its teacher: output-level and feature-level losses (A-SDM, BK-SDM).

The student learns the teacher's noise prediction (output KD) and the outputs of every block the
two share by name (feature KD: ``down_blocks.i``, ``mid_block`` if kept, ``up_blocks.j``), plus
the ordinary denoising loss on the data (task loss), the three terms of BK-SDM's recipe that
A-SDM's model assembly also distils with. Added here (``guidance_weight``): a loss on the
guidance direction (conditional minus unconditional prediction). On the zoo's digits-sd the
three terms alone left the assembled UNet at 0.36 prompt accuracy (teacher 0.975) although its
output KD loss was 0.1 % of the target's: the conditional part is a tiny share of the noise
prediction, and CFG multiplies exactly that part. Training is plain PyTorch on the given device with a
tqdm bar; checkpoints (safetensors weights + optimizer, via ``mmskip.train.checkpoint``) are
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
from tqdm.auto import tqdm

__all__ = ["DistillConfig", "distill", "shared_features"]

logger = logging.getLogger(__name__)


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


def distill(student: nn.Module, teacher: nn.Module, batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
            noise_scheduler: Any, config: DistillConfig | None = None, out: Path | None = None,
            desc: str = "distil", uncond: torch.Tensor | None = None) -> list[dict[str, float]]:
    """Train ``student`` toward ``teacher`` in place; returns the loss history (every 50 steps).

    ``batches(step)`` gives ``(latents, context)`` for a step (clean latents, already scaled by
    the VAE's scaling factor; text encoder hidden states). ``noise_scheduler`` is a diffusers
    training scheduler (``add_noise``, ``config.num_train_timesteps``, epsilon or v prediction).
    ``uncond``: the empty prompt's hidden states (one ``(tokens, dim)`` tensor), for the guidance loss.
    """
    from mmskip.train.checkpoint import fingerprint, load_checkpoint, save_checkpoint
    from mmskip.train.lr_schedule import warmup_cosine

    cfg = config or DistillConfig()
    if cfg.guidance_weight and uncond is None:
        raise ValueError("guidance_weight > 0 needs uncond= (the empty prompt's text encoder hidden states)")
    teacher.eval().requires_grad_(False)
    student.train().requires_grad_(True)
    names = shared_features(teacher, student)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    warm = max(1, cfg.steps // 20)

    def lr_at(step: int) -> float:
        return warmup_cosine(step, cfg.steps, warm, 0.1, decay_after_warmup=True)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ema = {k: v.detach().clone() for k, v in student.state_dict().items()} if cfg.ema else None
    start, history = 0, []
    if out is not None:
        got = load_checkpoint(Path(out), fingerprint(student))
        if got is not None:
            state, weights, optim = got
            student.load_state_dict({k: v.to(student.device) for k, v in weights.items()})
            opt.load_state_dict(optim)
            sched.load_state_dict(state["scheduler"])
            start, history = state["step"], state.get("history", [])
            if ema is not None and (Path(out) / "checkpoint" / "ema.safetensors").is_file():
                from safetensors.torch import load_file

                ema = load_file(str(Path(out) / "checkpoint" / "ema.safetensors"))
            logger.info("resuming %s at step %d", desc, start)
    pred_type = getattr(noise_scheduler.config, "prediction_type", "epsilon")
    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg.steps), desc=desc, initial=start, total=cfg.steps)
    for step in bar:
        latents, context = batches(step)
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        target = noise if pred_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, t)
        n = latents.shape[0]
        if cfg.guidance_weight:  # the same noisy inputs, also with the empty prompt
            noisy, t = torch.cat([noisy, noisy]), torch.cat([t, t])
            context = torch.cat([context, uncond.to(context).expand(n, *uncond.shape[-2:])])
        with torch.no_grad(), _capture(teacher, names) as tf:
            t_out = teacher(noisy, t, context).sample
        with _capture(student, names) as sf:
            s_out = student(noisy, t, context).sample
        task = F.mse_loss(s_out[:n], target)
        out_kd = F.mse_loss(s_out, t_out)
        feat_kd = sum(F.mse_loss(sf[k], tf[k]) for k in names)
        loss = cfg.task_weight * task + cfg.output_weight * out_kd + cfg.feature_weight * feat_kd
        guide = torch.zeros(())
        if cfg.guidance_weight:
            guide = F.mse_loss(s_out[:n] - s_out[n:], t_out[:n] - t_out[n:])
            loss = loss + cfg.guidance_weight * guide
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            with torch.no_grad():
                for k, v in student.state_dict().items():
                    ema[k].mul_(cfg.ema).add_(v.detach(), alpha=1 - cfg.ema) if v.is_floating_point() else ema[k].copy_(v)
        if step % 50 == 0 or step == cfg.steps - 1:
            rec = {"step": step, "loss": loss.item(), "task": task.item(), "output_kd": out_kd.item(),
                   "feature_kd": float(feat_kd), "guidance_kd": guide.item(), "seconds": time.perf_counter() - t0}
            history.append(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", out_kd=f"{rec['output_kd']:.4f}")
        done = step + 1
        if out is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            folder = save_checkpoint(Path(out), done, student.state_dict(), opt, sched,
                                     {"model": fingerprint(student), "history": history})
            if ema is not None:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in ema.items()}, str(folder / "ema.safetensors"))
    if ema is not None:
        student.load_state_dict(ema)
    student.eval().requires_grad_(False)
    return history
