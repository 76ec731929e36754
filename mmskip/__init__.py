"""mmskip: make existing models cheaper by not computing what does not matter.

One line to apply a technique, one to undo it::

    handle = mmskip.apply(model, mmskip.LayerSkipConfig(schedule=mmskip.schedules.unified(speedup=2.0)))
    handle.stats(); handle.remove()

The techniques' configs and ``apply`` load with ``import mmskip``; the subpackages
(``mmskip.diffusion``, ``mmskip.pipelines``, ``mmskip.zoo``, ``mmskip.eval``,
``mmskip.analysis``, ``mmskip.vision``) are imported on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import schedules
from .ffn_skip import FFNSkipConfig
from .inject import ConcurrentUseError, SkipConfig, SkipHandle, TechniqueState, applied, apply
from .layer_skip import LayerSkipConfig
from .registry import UnsupportedModelError
from .routers import RouterConfig
from .speculative import SelfSpeculativeConfig
from .void_layers import VoidLayerConfig

if TYPE_CHECKING:
    from . import analysis, diffusion, eval, pipelines, vision, zoo  # noqa: F401

_LAZY = ("analysis", "diffusion", "eval", "pipelines", "vision", "zoo")

__all__ = [
    "schedules",
    "apply",
    "applied",
    "SkipConfig",
    "SkipHandle",
    "TechniqueState",
    "ConcurrentUseError",
    "LayerSkipConfig",
    "FFNSkipConfig",
    "VoidLayerConfig",
    "SelfSpeculativeConfig",
    "RouterConfig",
    "UnsupportedModelError",
    *_LAZY,
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'mmskip' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
