"""How the trainer trains (the objectives say what it trains for)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["TrainConfig"]

_PRECISIONS = ("no", "fp16", "bf16")
_TRAINABLE = ("all", "lora", "none")
_SCHEDULES = ("cosine", "cosine_after_warmup", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings for :func:`mmskip.train.train`.

    Args:
        steps: optimizer steps.
        batch_size: token windows per optimizer step, split into ``grad_accum`` micro-batches.
        seq_len: tokens per window.
        lr: peak AdamW learning rate: linear warm-up over ``warmup`` steps, then cosine decay to
            ``min_lr_ratio * lr`` (see ``lr_schedule``).
        warmup: warm-up steps.
        lr_schedule: ``"cosine"`` (the cosine runs over the whole run and the warm-up ramp multiplies
            it), ``"cosine_after_warmup"`` (the ramp alone, then the cosine over the steps after it) or
            ``"constant"`` (``lr`` throughout; ``warmup`` ignored). All come from ``warmup_cosine``.
        min_lr_ratio: where the cosine decay ends, as a fraction of ``lr``.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        max_grad_norm: gradient clipping (0 turns it off).
        grad_accum: micro-batches per optimizer step (accelerate's gradient accumulation).
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"`` (accelerate's autocast + scaling).
        trainable: ``"all"`` (every model weight), ``"lora"`` (peft LoRA adapters, merged back at
            the end) or ``"none"`` (only parameters objectives bring, e.g. routers).
        lora_rank: LoRA rank when ``trainable="lora"``.
        lora_targets: module-name suffixes LoRA adapts (default: attention and MLP projections).
        merge_lora: fold the adapters into the weights at the end (``False`` returns the peft model,
            e.g. to save the adapter with ``save_pretrained`` first).
        seed: seeds window sampling and layer dropout per step, so a resumed run draws exactly
            what an uninterrupted one would.
        eval_every: steps between held-out evaluations (0: only at the end).
        eval_windows: held-out windows per evaluation.
        save_every: steps between checkpoints when the trainer has an ``out`` folder (0: only at the end).
        log_every: steps between loss entries in the history.
        cpu: train on the CPU even when a GPU is present.
        ema: decay of an exponential moving average of the trained weights that the loop keeps,
            checkpoints and returns (0: none).
        ema_warmup: the EMA decay warms up as ``min(ema, (1 + step) / (10 + step))``.
        time_limit_s: stop (with a checkpoint and a warning) once training has run this long.

    ``batch_size``, ``seq_len``, ``trainable``, ``lora_*`` and ``eval_windows`` are read by the LM
    trainer (:func:`mmskip.train.train`); other tasks read ``batch_size`` and ``seed`` for their batches.
    """

    steps: int = 300
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 1e-3
    warmup: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    mixed_precision: str = "no"
    trainable: str = "all"
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                     "c_attn", "c_proj", "c_fc")
    merge_lora: bool = True
    seed: int = 0
    eval_every: int = 0
    eval_windows: int = 16
    save_every: int = 0
    log_every: int = 10
    cpu: bool = False
    lr_schedule: str = "cosine"
    ema: float = 0.0
    ema_warmup: bool = False
    time_limit_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "eval_every", "save_every", "eval_windows"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"TrainConfig.batch_size ({self.batch_size}) must be a multiple of grad_accum "
                             f"({self.grad_accum}): each optimizer step is grad_accum equal micro-batches")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.mixed_precision not in _PRECISIONS:
            raise ValueError(f"TrainConfig.mixed_precision must be one of {_PRECISIONS}, got {self.mixed_precision!r}")
        if self.trainable not in _TRAINABLE:
            raise ValueError(f"TrainConfig.trainable must be one of {_TRAINABLE}, got {self.trainable!r}")
        if self.lr_schedule not in _SCHEDULES:
            raise ValueError(f"TrainConfig.lr_schedule must be one of {_SCHEDULES}, got {self.lr_schedule!r}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"TrainConfig.ema must lie in [0, 1), got {self.ema}")
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise ValueError(f"TrainConfig.time_limit_s must be > 0 (or None), got {self.time_limit_s}")
        if self.trainable == "lora" and self.lora_rank < 1:
            raise ValueError(f"TrainConfig.lora_rank must be >= 1, got {self.lora_rank}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"], d["lora_targets"] = list(self.betas), list(self.lora_targets)
        return d
