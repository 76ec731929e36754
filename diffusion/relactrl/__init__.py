"""RelaCtrl: relevance-guided, lighter control branches for diffusion transformers.

RelaCtrl (https://arxiv.org/abs/2502.14377): score every control position of a trained
ControlNet by skipping it (:func:`relevance`), put fewer, relevance-sized blocks only where
control matters (:func:`allocate`), and build them from Two-Dimensional Shuffle Mixers
(:class:`TDSMBlock`) in :class:`RelaCtrlFluxNet`, a drop-in for ``FluxControlNetModel`` in
``FluxControlNetPipeline``. :func:`train_control` trains any Flux control branch with the base
frozen; :func:`skipped_control` drops positions of an existing ControlNet at inference.
"""

from .allocate import BranchPlan, allocate
from .branch import RelaCtrlFluxNet
from .positions import ControlPosition, UnsupportedControlNetError, control_positions, skipped_control
from .relevance import RelevanceReport, generate_controlled, relevance
from .tdsm import TDSMBlock
from .train import ControlData, ControlTrainConfig, train_control

__all__ = [
    "relevance",
    "RelevanceReport",
    "generate_controlled",
    "allocate",
    "BranchPlan",
    "RelaCtrlFluxNet",
    "TDSMBlock",
    "control_positions",
    "skipped_control",
    "ControlPosition",
    "UnsupportedControlNetError",
    "ControlData",
    "ControlTrainConfig",
    "train_control",
]
