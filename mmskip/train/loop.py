"""The one training loop: every technique that learns brings a :class:`TrainTask` (what trains and
its loss per step) and :func:`fit` does the rest the same way for all of them.

``fit`` owns the optimizer (AdamW), the learning-rate shape (:func:`~mmskip.train.lr_schedule.warmup_cosine`),
accelerate (devices, mixed precision, gradient accumulation), gradient clipping, an optional EMA of
the trained weights, the progress bar, the loss history, a NaN check, a time limit, and resumable
checkpoints (:mod:`mmskip.train.checkpoint`: safetensors + JSON). The LM trainer
(:func:`mmskip.train.train`), p-MoD's routers, MuE's layer-wise training, RelaCtrl's control branch,
assembly distillation and the zoo's recipes are each one :class:`TrainTask`.

    class Denoise(TrainTask):
        def weights(self): return dict(self.net.named_parameters())
        def batch(self, step): return make_batch(torch.Generator().manual_seed(step))
        def loss(self, batch, step): return {"mse": F.mse_loss(self.net(batch.x), batch.y)}

    fit(Denoise(), TrainConfig(steps=1000, batch_size=64, lr=1e-3, warmup=50), out="runs/denoise")
"""

from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .lr_schedule import warmup_cosine

__all__ = ["TrainTask", "FitResult", "fit", "split_batch", "named_weights"]

logger = logging.getLogger(__name__)


def split_batch(batch: Any, parts: int) -> list[Any]:
    """``batch`` (a tensor, or a dict / tuple / list of them) cut into ``parts`` equal micro-batches
    along the first dimension; non-tensor values are shared by every part."""
    if parts == 1:
        return [batch]
    if isinstance(batch, torch.Tensor):
        if len(batch) % parts:
            raise ValueError(f"a batch of {len(batch)} cannot be split into {parts} equal micro-batches")
        return list(batch.chunk(parts))
    if isinstance(batch, dict):
        cut = {k: split_batch(v, parts) if isinstance(v, (torch.Tensor, dict, tuple, list)) else [v] * parts
               for k, v in batch.items()}
        return [{k: v[i] for k, v in cut.items()} for i in range(parts)]
    if isinstance(batch, (tuple, list)):
        cut = [split_batch(v, parts) for v in batch]
        return [type(batch)(v[i] for v in cut) for i in range(parts)]
    raise TypeError(f"cannot split a {type(batch).__name__} into micro-batches; give tensors, dicts or tuples")


class TrainTask(ABC):
    """What one kind of training brings to :func:`fit`: its trainable weights, a batch per step, and
    the loss terms of a (micro-)batch. Everything else is the loop's.

    Lifecycle: ``fingerprint()`` and ``load_state()`` (resume) before training, ``prepare()`` once,
    then per optimizer step ``batch(step)``, ``loss(micro, step)`` per micro-batch and
    ``after_step(step)``; ``evaluate(step)`` every ``eval_every`` steps and at the end; ``finish()``
    always (also when training raises).
    """

    desc = "train"  # the progress bar's label

    @abstractmethod
    def weights(self) -> dict[str, torch.Tensor]:
        """The tensors the optimizer trains, by checkpoint name (stable across runs)."""

    def param_groups(self, config: TrainConfig) -> list[dict[str, Any]]:
        """AdamW parameter groups (default: one group of :meth:`weights` at ``config.weight_decay``)."""
        return [{"params": list(self.weights().values()), "weight_decay": config.weight_decay}]

    @abstractmethod
    def batch(self, step: int) -> Any:
        """The training batch of optimizer step ``step``. Draw it from a generator seeded by ``step``
        (or skip what earlier steps used), so a resumed run sees what an uninterrupted one would."""

    @abstractmethod
    def loss(self, batch: Any, step: int) -> dict[str, torch.Tensor]:
        """Named loss terms of one micro-batch; the loop minimises their sum."""

    def prepare(self, accelerator: Any) -> None:
        """Put what trains on ``accelerator.device`` (or ``accelerator.prepare`` a model)."""
        return None

    def metrics(self) -> dict[str, float]:
        """Numbers about the last micro-batch to log beside the loss (not optimised)."""
        return {}

    def after_step(self, step: int) -> None:
        """Called after each optimizer step (curricula, custom records)."""
        return None

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out numbers at ``step`` (``{}``: none); logged in the history."""
        return {}

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors checkpointed beside the weights and restored in place on resume (not optimised)."""
        return {}

    def fingerprint(self) -> dict[str, Any] | None:
        """What a checkpoint must have been written for (``None``: no check)."""
        return None

    def state(self) -> dict[str, Any]:
        """The task's own JSON-able record, kept in the checkpoint."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Take back :meth:`state` from a checkpoint; raise ``ValueError`` if it cannot continue it."""
        return None

    def finish(self) -> None:
        """Undo what :meth:`prepare` and the task changed on models (hooks, flags), also after an error."""
        return None


@dataclass
class FitResult:
    """What :func:`fit` returns."""

    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    ema: dict[str, torch.Tensor] | None = None
    stopped_early: bool = False


def _lr_factor(config: TrainConfig, step: int) -> float:
    if config.lr_schedule == "constant":
        return 1.0
    after = config.lr_schedule == "cosine_after_warmup"
    total = config.steps if after else max(config.steps - 1, 1)
    return warmup_cosine(step, total, config.warmup, config.min_lr_ratio, decay_after_warmup=after)


def _fresh_accelerator_state(config: TrainConfig) -> None:
    """accelerate keeps one process-wide state and refuses a second ``Accelerator`` with another
    precision or device; a library may train several times in one process, so start afresh then."""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state:
        state = AcceleratorState()
        if state.mixed_precision != config.mixed_precision or (config.cpu and state.device.type != "cpu"):
            AcceleratorState._reset_state(reset_partial_state=True)


@torch.no_grad()
def _ema_update(ema: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], step: int,
                config: TrainConfig) -> None:
    decay = min(config.ema, (1 + step) / (10 + step)) if config.ema_warmup else config.ema
    for k, w in weights.items():
        ema[k].lerp_(w.detach().to(ema[k].dtype), 1 - decay)


def fit(task: TrainTask, config: TrainConfig | None = None, out: str | Path | None = None, resume: bool = False,
        progress: bool = True, stop_at: int | None = None, meta: dict[str, Any] | None = None) -> FitResult:
    """Train ``task`` for ``config.steps`` optimizer steps; returns the history.

    With ``out``, ``out/checkpoint/`` is written every ``config.save_every`` steps and at the end;
    ``resume=True`` continues it (same batches, same optimizer moments, this call's learning rate)
    or starts afresh when there is none. ``stop_at``: stop after that step with a checkpoint (a
    time-boxed run). ``config.time_limit_s`` stops early the same way, with a warning. ``meta``:
    JSON fields written into the checkpoint beside the task's own state.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    config = config or TrainConfig()
    out = Path(out) if out is not None else None
    if resume and out is None:
        raise ValueError("resume=True needs the out folder the checkpoint was written to")
    resumed = load_checkpoint(out, task.fingerprint()) if resume else None

    set_seed(config.seed)
    _fresh_accelerator_state(config)
    accelerator = Accelerator(mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.grad_accum,
                              cpu=config.cpu)
    stopped_early = False
    try:
        task.prepare(accelerator)
        weights = task.weights()
        if not weights:
            raise ValueError("nothing to train: the task names no trainable weights")
        extra = task.extra_tensors()
        opt = torch.optim.AdamW(task.param_groups(config), lr=config.lr, betas=config.betas,
                                weight_decay=config.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(config, s))
        opt = accelerator.prepare(opt)
        ema = {k: w.detach().clone().float() for k, w in weights.items()} if config.ema else None
        start, history, seconds = 0, [], 0.0
        if resumed is not None:
            state, saved, optim = resumed
            trained = {k: v for k, v in saved.items() if not k.startswith(("ema.", "extra."))}
            if set(trained) != set(weights):
                raise ValueError(f"the checkpoint in {out} trained other weights ({len(trained)} tensors vs "
                                 f"{len(weights)}): resume with the same task and settings, or train into "
                                 "another folder")
            task.load_state(state.get("task", {}))
            with torch.no_grad():
                for k, w in weights.items():
                    w.copy_(saved[k].to(w.device, w.dtype))
                for k, t in extra.items():
                    t.copy_(saved[f"extra.{k}"].to(t.device, t.dtype))
            if ema is not None:
                ema = {k: saved[f"ema.{k}"].float() if f"ema.{k}" in saved else v for k, v in ema.items()}
            opt.load_state_dict(optim)
            sched.load_state_dict(state["scheduler"])
            sched.base_lrs = [config.lr] * len(opt.param_groups)  # this call's peak learning rate
            for group in opt.param_groups:
                group["lr"] = config.lr * _lr_factor(config, state["step"])
            start, history, seconds = state["step"], state.get("history", []), state.get("seconds", 0.0)
            logger.info("%s: resumed from %s at step %d", task.desc, out, start)

        def checkpoint(step: int) -> None:
            if out is None or not accelerator.is_main_process:
                return
            tensors = dict(weights)
            tensors.update({f"extra.{k}": v for k, v in extra.items()})
            if ema is not None:
                tensors.update({f"ema.{k}": v for k, v in ema.items()})
            save_checkpoint(out, step, tensors, opt, sched, {
                "model": task.fingerprint(), "config": config.to_dict(), "task": task.state(), "history": history,
                "seconds": seconds + time.perf_counter() - t0, **(meta or {})})

        params = [p for g in opt.param_groups for p in g["params"]]
        t0 = time.perf_counter()
        done = start
        bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=task.desc,
                   disable=not progress, mininterval=1.0)
        try:
            for step in bar:
                terms_sum: dict[str, float] = {}
                metrics: dict[str, float] = {}
                for micro in split_batch(task.batch(step), config.grad_accum):
                    with accelerator.accumulate(), accelerator.autocast():
                        terms = task.loss(micro, step)
                        loss = sum(terms.values())
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and config.max_grad_norm:
                            accelerator.clip_grad_norm_(params, config.max_grad_norm)
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                    for k, v in terms.items():
                        terms_sum[k] = terms_sum.get(k, 0.0) + float(v.detach()) / config.grad_accum
                    for k, v in task.metrics().items():
                        metrics[k] = metrics.get(k, 0.0) + v / config.grad_accum
                sched.step()
                if ema is not None:
                    _ema_update(ema, weights, step, config)
                task.after_step(step)
                total = sum(terms_sum.values())
                if not math.isfinite(total):
                    raise FloatingPointError(f"{task.desc}: the loss became {total} at step {step} ({terms_sum}); "
                                             "lower the lr or use mixed_precision='bf16' instead of 'fp16'")
                done = step + 1
                if done % 10 == 0 or done == config.steps:
                    bar.set_postfix(loss=f"{total:.4f}")
                if step % config.log_every == 0 or done == config.steps:
                    history.append({"step": done, "loss": total, **terms_sum, **metrics, "lr": sched.get_last_lr()[0]})
                if done == config.steps or (config.eval_every and done % config.eval_every == 0):
                    scores = task.evaluate(done)
                    if scores:
                        history.append({"step": done, **scores})
                        logger.info("%s step %d: %s", task.desc, done, scores)
                if done == stop_at:
                    stopped_early = done < config.steps
                    break
                if config.time_limit_s is not None and time.perf_counter() - t0 > config.time_limit_s:
                    logger.warning("%s: time limit %.0f s reached after %d of %d steps", task.desc,
                                   config.time_limit_s, done, config.steps)
                    stopped_early = done < config.steps
                    break
                if config.save_every and done % config.save_every == 0 and done < config.steps:
                    checkpoint(done)
            checkpoint(done)
        finally:
            bar.close()
        seconds += time.perf_counter() - t0
    finally:
        task.finish()
    return FitResult(history, done, seconds, ema, stopped_early)


def named_weights(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """``module``'s parameters that require a gradient, named ``prefix + name`` (for :meth:`TrainTask.weights`)."""
    return {f"{prefix}{n}": p for n, p in module.named_parameters() if p.requires_grad}

