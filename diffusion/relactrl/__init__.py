"""RelaCtrl: relevance-guided, lighter control branches for diffusion transformers.

RelaCtrl (https://arxiv.org/abs/2502.14377): score every control position of a trained
ControlNet by skipping it (:func:`relevance`), put fewer, relevance-sized blocks only where
control matters (:func:`allocate`), and build them from Two-Dimensional Shuffle Mixers
(:class:`TDSMBlock`) in :class:`RelaCtrlFluxNet`, a drop-in for ``FluxControlNetModel`` in
``FluxControlNetPipeline``. :func:`train_control` trains any Flux control branch with the base
frozen; :class:`ControlSkipConfig` (technique ``relactrl``, ``mmskip.apply(controlnet, config)``)
drops positions of an existing ControlNet at inference, :func:`skipped_control` for a ``with`` block.

The skipping technique's four parts: :mod:`.config`, :mod:`.state`, :mod:`.hooks` (and ``attach``);
:mod:`.positions` says where a ControlNet's control positions are.
"""

from .allocate import BranchPlan, allocate
from .branch import RelaCtrlFluxNet
from .config import ControlSkipConfig
from .positions import ControlPosition, UnsupportedControlNetError, control_positions, skipped_control
from .relevance import RelevanceReport, generate_controlled, relevance
from .state import ControlSkipState
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
    "ControlSkipConfig",
    "ControlSkipState",
    "ControlPosition",
    "UnsupportedControlNetError",
    "ControlData",
    "ControlTrainConfig",
    "train_control",
]
