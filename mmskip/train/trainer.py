"""One training loop for every technique that learns: accelerate for devices, mixed precision and
gradient accumulation; objectives for what is learned; safetensors + JSON checkpoints to resume."""

from __future__ import annotations

import logging
import math
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import fingerprint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import FixedWindows, TokenWindows
from .lora import add_lora, merge_lora
from .lr_schedule import warmup_cosine
from .objectives import EarlyExitLoss, LanguageModeling, Objective, StepContext
from .objectives.language_modeling import next_token_loss

__all__ = ["train", "TrainResult", "check_objectives"]

logger = logging.getLogger(__name__)

@dataclass
class TrainResult:
    """What :func:`train` returns: the trained model (LoRA merged back) and what happened."""

    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0

    @property
    def evaluations(self) -> list[dict[str, Any]]:
        return [h for h in self.history if "eval_loss" in h]


def check_objectives(model: nn.Module, objectives: list[Objective], config: TrainConfig) -> None:
    """Refuse, before any training, a set of objectives that cannot train ``model``."""
    if not objectives:
        raise ValueError("give at least one objective, e.g. [mmskip.train.LanguageModeling()]")
    for obj in objectives:
        if not isinstance(obj, Objective):
            raise TypeError(f"objectives must be mmskip.train objectives, got {type(obj).__name__}")
    kinds = [type(o) for o in objectives]
    for k in set(kinds):
        if kinds.count(k) > 1:
            raise ValueError(f"{k.__name__} is given {kinds.count(k)} times; give each objective once")
    if not any(type(o).loss is not Objective.loss for o in objectives):  # only objectives that define a loss
        raise ValueError(f"none of {objectives} has a loss; add LanguageModeling(), Distillation() or EarlyExitLoss()")
    if EarlyExitLoss in kinds and LanguageModeling in kinds:
        raise ValueError("EarlyExitLoss already includes the last layer's language-modeling loss; drop LanguageModeling")
    if config.trainable == "none" and not any(o.parameters() for o in objectives):
        raise ValueError("TrainConfig(trainable='none') trains only objectives' own parameters, and none of "
                         f"{objectives} has any; use trainable='all' or 'lora'")
    for obj in objectives:
        obj.check(model)


def _lr_lambda(config: TrainConfig):
    def fn(step: int) -> float:
        return warmup_cosine(step, max(config.steps - 1, 1), config.warmup, config.min_lr_ratio)
    return fn


def _windows(data: Any, seq_len: int, name: str) -> TokenWindows | FixedWindows:
    if isinstance(data, (TokenWindows, FixedWindows)):
        if data.seq_len != seq_len:
            raise ValueError(f"{name} has {data.seq_len}-token windows but TrainConfig.seq_len is {seq_len}")
        return data
    return TokenWindows(data, seq_len, name)


def _trainable_weights(model: nn.Module, objectives: list[Objective]) -> dict[str, nn.Parameter]:
    named = {f"model.{n}": p for n, p in model.named_parameters() if p.requires_grad}
    for i, obj in enumerate(objectives):
        named.update({f"objective{i}.{j}": p for j, p in enumerate(obj.parameters())})
    return named


def _paused(stack: ExitStack, objectives: list[Objective]) -> None:
    """Enter every objective's ``paused()`` on ``stack``: the forward the unmodified model runs."""
    for obj in objectives:
        stack.enter_context(obj.paused())


@torch.no_grad()
def _evaluate(model: nn.Module, windows: torch.Tensor, objectives: list[Objective], device: torch.device,
              batch: int) -> dict[str, float]:
    """Held-out loss with the objectives' effect on the forward (``eval_*``) and without it (``full_*``)."""
    was_training = model.training
    model.eval()
    out = {}
    for prefix, paused in (("eval", False), ("full", True)):
        tot = 0.0
        with ExitStack() as stack:
            if paused:
                _paused(stack, objectives)
            for i in range(0, len(windows), batch):
                x = windows[i:i + batch].to(device)
                tot += next_token_loss(model(input_ids=x, use_cache=False).logits, x).item() * len(x)
        loss = tot / len(windows)
        out[f"{prefix}_loss"], out[f"{prefix}_ppl"] = loss, math.exp(min(loss, 50.0))
    model.train(was_training)
    return out


def _fresh_accelerator_state(config: TrainConfig) -> None:
    """accelerate keeps one process-wide state and refuses a second ``Accelerator`` with another
    precision or device; a library may train several times in one process, so start afresh then."""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state:
        state = AcceleratorState()
        if state.mixed_precision != config.mixed_precision or (config.cpu and state.device.type != "cpu"):
            AcceleratorState._reset_state(reset_partial_state=True)


def train(model: nn.Module, objectives: list[Objective], data: Any, config: TrainConfig | None = None,
          eval_data: Any = None, out: str | Path | None = None, resume: bool = False,
          progress: bool = True, stop_at: int | None = None) -> TrainResult:
    """Train ``model`` for ``objectives`` on random windows of ``data`` (a 1-D token tensor,
    :class:`TokenWindows` or :class:`FixedWindows`).

    Everything that can be refused is refused before the first step: objectives that do not fit
    the model, too little data, a checkpoint in ``out`` written for another model. With ``out``,
    checkpoints go to ``out/checkpoint`` every ``config.save_every`` steps and at the end;
    ``resume=True`` continues from there (same windows, same dropout draws, same optimizer state).
    ``eval_data`` (held-out tokens) is scored every ``config.eval_every`` steps and at the end.
    ``stop_at``: stop after that step with a checkpoint (a time-boxed run; resume it later).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    config = config or TrainConfig()
    objectives = list(objectives)
    check_objectives(model, objectives, config)
    train_windows = _windows(data, config.seq_len, "training data")
    eval_set = None
    if eval_data is not None and config.eval_windows:
        eval_windows = _windows(eval_data, config.seq_len, "eval data")
        eval_set = eval_windows.ordered(config.eval_windows)
    out = Path(out) if out is not None else None
    if resume and out is None:
        raise ValueError("resume=True needs the out folder the checkpoint was written to")
    model_print = fingerprint(model)
    resumed = load_checkpoint(out, model_print) if resume else None

    set_seed(config.seed)
    _fresh_accelerator_state(config)
    accelerator = Accelerator(mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.grad_accum,
                              cpu=config.cpu)
    originally_trainable = list(model.parameters())
    trainable_flags = [p.requires_grad for p in originally_trainable]
    for p in originally_trainable:
        p.requires_grad_(config.trainable == "all")
    if config.trainable == "lora":
        model = add_lora(model, config.lora_rank, config.lora_targets)
    base = model.get_base_model() if config.trainable == "lora" else model
    for obj in objectives:
        obj.attach(base)
    weights = _trainable_weights(model, objectives)
    if not weights:
        raise ValueError("nothing to train: no parameter requires a gradient")
    opt = torch.optim.AdamW(list(weights.values()), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config))
    model, opt = accelerator.prepare(model, opt)
    for obj in objectives:
        for p in obj.parameters():
            p.data = p.data.to(accelerator.device)
    start, history = 0, []
    if resumed is not None:
        state, saved, optim = resumed
        if set(saved) != set(weights):
            raise ValueError(f"the checkpoint in {out} trained other parameters ({len(saved)} tensors vs "
                             f"{len(weights)}): resume with the same objectives and TrainConfig.trainable")
        with torch.no_grad():
            for k, p in weights.items():
                p.copy_(saved[k].to(p.device, p.dtype))
        opt.load_state_dict(optim)
        sched.load_state_dict(state["scheduler"])
        start, history = state["step"], state["history"]
        logger.info("resumed from %s at step %d", out, start)

    def teacher(x: torch.Tensor):
        def run() -> torch.Tensor:
            with ExitStack() as stack, torch.no_grad():
                _paused(stack, objectives)
                stack.enter_context(model.disable_adapter() if config.trainable == "lora" else nullcontext())
                return model(input_ids=x, use_cache=False).logits
        return run

    def checkpoint(step: int) -> None:
        if out is not None and accelerator.is_main_process:
            meta = {"model": model_print, "config": config.to_dict(), "objectives": [repr(o) for o in objectives],
                    "history": history}
            save_checkpoint(out, step, weights, opt, sched, meta)

    t0 = time.perf_counter()
    micro = config.batch_size // config.grad_accum
    model.train()
    done = start
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="train", disable=not progress)
    try:
        for step in bar:
            for obj in objectives:
                obj.begin_step(step, config.steps)
            windows = train_windows.batch(step, config.batch_size, config.seed).to(accelerator.device)
            terms_sum: dict[str, float] = {}
            metrics: dict[str, float] = {}
            for x in windows.split(micro):
                with accelerator.accumulate(model), accelerator.autocast():
                    logits = model(input_ids=x, use_cache=False).logits
                    ctx = StepContext(step, config.steps, x, logits, teacher(x))
                    terms = {k: v for obj in objectives for k, v in obj.loss(ctx).items()}
                    loss = sum(terms.values())
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.max_grad_norm:
                        accelerator.clip_grad_norm_(list(weights.values()), config.max_grad_norm)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                for k, v in terms.items():
                    terms_sum[k] = terms_sum.get(k, 0.0) + float(v.detach()) / config.grad_accum
                for obj in objectives:
                    for k, v in obj.metrics().items():
                        metrics[k] = metrics.get(k, 0.0) + v / config.grad_accum
            sched.step()
            total = sum(terms_sum.values())
            if not math.isfinite(total):
                raise FloatingPointError(f"the loss became {total} at step {step} ({terms_sum}); lower the lr or "
                                         "use mixed_precision='bf16' instead of 'fp16'")
            bar.set_postfix(loss=f"{total:.3f}")
            done = step + 1
            if step % config.log_every == 0 or done == config.steps:
                history.append({"step": done, "loss": total, **terms_sum, **metrics, "lr": sched.get_last_lr()[0]})
            if eval_set is not None and (done == config.steps or (config.eval_every and done % config.eval_every == 0)):
                history.append({"step": done, **_evaluate(model, eval_set, objectives, accelerator.device, micro)})
                logger.info("step %d: %s", done, history[-1])
            if done == stop_at:
                break
            if config.save_every and done % config.save_every == 0 and done < config.steps:
                checkpoint(done)
        checkpoint(done)
    finally:
        bar.close()
        for obj in objectives:
            obj.detach()
    model = accelerator.unwrap_model(model)
    if config.trainable == "lora" and config.merge_lora:
        model = merge_lora(model)
    if config.trainable != "lora" or config.merge_lora:  # a returned peft model keeps only adapters trainable
        for p, flag in zip(originally_trainable, trainable_flags):
            p.requires_grad_(flag)
    return TrainResult(model, history, done, time.perf_counter() - t0)
