"""Skip-aware training: one trainer (on accelerate) and composable objectives.

    from mmskip.train import train, TrainConfig, LayerDropout, EarlyExitLoss
    result = train(model, [LayerDropout(0.2), EarlyExitLoss(e_scale=0.3)], tokens, TrainConfig(steps=800))

Every other technique that learns (p-MoD routers, MuE layer-wise, RelaCtrl's branch, assembly
distillation, the zoo's recipes) is a :class:`TrainTask` trained by the same loop, :func:`fit`.

``python -m mmskip.train --help`` lists the objectives and trains a zoo or local LM from the shell.
"""

from .config import TrainConfig
from .data import TokenWindows, token_stream
from .loop import FitResult, TrainTask, fit, split_batch
from .objectives import (
    Distillation,
    EarlyExitLoss,
    LanguageModeling,
    LayerDropout,
    Objective,
    RouterGates,
    ScheduleAware,
    StepContext,
)
from .trainer import TrainResult, check_objectives, train

__all__ = ["train", "fit", "TrainTask", "FitResult", "split_batch", "TrainConfig", "TrainResult", "TokenWindows", "token_stream", "check_objectives", "Objective",
           "StepContext", "LanguageModeling", "Distillation", "ScheduleAware", "LayerDropout", "EarlyExitLoss",
           "RouterGates"]
