"""Composable training objectives: each a loss term and the hooks it needs (see :class:`Objective`)."""

from .base import Objective, StepContext
from .early_exit import EarlyExitLoss
from .language_modeling import Distillation, LanguageModeling
from .layer_dropout import LayerDropout
from .router_gates import RouterGates
from .schedule_aware import ScheduleAware

__all__ = ["Objective", "StepContext", "LanguageModeling", "Distillation", "ScheduleAware", "LayerDropout",
           "EarlyExitLoss", "RouterGates"]
