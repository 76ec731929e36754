"""mmskip: make existing models cheaper by not computing what does not matter.

One line to apply a technique, one to undo it::

    handle = mmskip.apply(model, mmskip.LayerSkipConfig(schedule=mmskip.schedules.unified(speedup=2.0)))
    handle.stats(); handle.remove()
"""

from . import analysis, schedules
from .ffn_skip import FFNSkipConfig
from .inject import SkipConfig, SkipHandle, applied, apply
from .layer_skip import LayerSkipConfig
from .registry import UnsupportedModelError
from .routers import RouterConfig
from .speculative import SelfSpeculativeConfig
from .void_layers import VoidLayerConfig

__all__ = [
    "schedules",
    "analysis",
    "apply",
    "applied",
    "SkipConfig",
    "SkipHandle",
    "LayerSkipConfig",
    "FFNSkipConfig",
    "VoidLayerConfig",
    "SelfSpeculativeConfig",
    "RouterConfig",
    "UnsupportedModelError",
]
__version__ = "0.1.0"
