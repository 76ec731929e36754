"""The LM trainer: a causal LM trained for composable objectives on token windows, as one
:class:`~mmskip.train.loop.TrainTask` of the one loop (:func:`~mmskip.train.loop.fit`)."""

from __future__ import annotations

import logging
import math
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import fingerprint, load_checkpoint
from .config import TrainConfig
from .data import FixedWindows, TokenWindows
from .loop import TrainTask, fit
from .lora import add_lora, merge_lora
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


def _windows(data: Any, seq_len: int, name: str) -> TokenWindows | FixedWindows:
    if isinstance(data, (TokenWindows, FixedWindows)):
        if data.seq_len != seq_len:
            raise ValueError(f"{name} has {data.seq_len}-token windows but TrainConfig.seq_len is {seq_len}")
        return data
    return TokenWindows(data, seq_len, name)


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


class _LanguageModelTask(TrainTask):
    """A causal LM trained for composable objectives on token windows (what :func:`train` fits)."""

    desc = "train"

    def __init__(self, model: nn.Module, objectives: list[Objective], windows: TokenWindows | FixedWindows,
                 eval_set: torch.Tensor | None, config: TrainConfig) -> None:
        self.model, self.objectives, self.windows, self.eval_set, self.config = (model, objectives, windows,
                                                                                   eval_set, config)
        self.model_print = fingerprint(model)
        self.originally_trainable = list(model.parameters())
        self.trainable_flags = [p.requires_grad for p in self.originally_trainable]
        for p in self.originally_trainable:
            p.requires_grad_(config.trainable == "all")
        if config.trainable == "lora":
            self.model = add_lora(model, config.lora_rank, config.lora_targets)
        base = self.model.get_base_model() if config.trainable == "lora" else self.model
        for obj in objectives:
            obj.attach(base)
        self._weights = {f"model.{n}": p for n, p in self.model.named_parameters() if p.requires_grad}
        for i, obj in enumerate(objectives):
            self._weights.update({f"objective{i}.{j}": p for j, p in enumerate(obj.parameters())})
        self.device = torch.device("cpu")

    def fingerprint(self) -> dict[str, Any]:
        return self.model_print

    def weights(self) -> dict[str, torch.Tensor]:
        return self._weights

    def prepare(self, accelerator: Any) -> None:
        self.model = accelerator.prepare(self.model)
        self.device = accelerator.device
        for obj in self.objectives:
            for p in obj.parameters():
                p.data = p.data.to(self.device)
        self.model.train()

    def batch(self, step: int) -> torch.Tensor:
        for obj in self.objectives:
            obj.begin_step(step, self.config.steps)
        return self.windows.batch(step, self.config.batch_size, self.config.seed).to(self.device)

    def _teacher(self, x: torch.Tensor):
        def run() -> torch.Tensor:
            with ExitStack() as stack, torch.no_grad():
                _paused(stack, self.objectives)
                stack.enter_context(self.model.disable_adapter() if self.config.trainable == "lora"
                                    else nullcontext())
                return self.model(input_ids=x, use_cache=False).logits
        return run

    def loss(self, batch: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        logits = self.model(input_ids=batch, use_cache=False).logits
        ctx = StepContext(step, self.config.steps, batch, logits, self._teacher(batch))
        return {k: v for obj in self.objectives for k, v in obj.loss(ctx).items()}

    def metrics(self) -> dict[str, float]:
        return {k: v for obj in self.objectives for k, v in obj.metrics().items()}

    def evaluate(self, step: int) -> dict[str, float]:
        if self.eval_set is None:
            return {}
        return _evaluate(self.model, self.eval_set, self.objectives, self.device,
                         self.config.batch_size // self.config.grad_accum)

    def finish(self) -> None:
        for obj in self.objectives:
            obj.detach()

    def result_model(self) -> nn.Module:
        from accelerate.utils import extract_model_from_parallel

        model = extract_model_from_parallel(self.model)
        if self.config.trainable == "lora" and self.config.merge_lora:
            model = merge_lora(model)
        if self.config.trainable != "lora" or self.config.merge_lora:  # a returned peft model keeps adapters trainable
            for p, flag in zip(self.originally_trainable, self.trainable_flags):
                p.requires_grad_(flag)
        return model


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
    config = config or TrainConfig()
    objectives = list(objectives)
    check_objectives(model, objectives, config)
    train_windows = _windows(data, config.seq_len, "training data")
    eval_set = None
    if eval_data is not None and config.eval_windows:
        eval_set = _windows(eval_data, config.seq_len, "eval data").ordered(config.eval_windows)
    if resume and out is None:
        raise ValueError("resume=True needs the out folder the checkpoint was written to")
    if resume:
        load_checkpoint(out, fingerprint(model))  # a checkpoint of another model is refused before any change
    task = _LanguageModelTask(model, objectives, train_windows, eval_set, config)
    try:
        fitted = fit(task, config, out, resume=resume, progress=progress, stop_at=stop_at,
                     meta={"objectives": [repr(o) for o in objectives]})
    except BaseException:
        task.result_model()
        raise
    return TrainResult(task.result_model(), fitted.history, fitted.steps, fitted.seconds)
