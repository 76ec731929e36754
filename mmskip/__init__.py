"""mmskip: make existing models cheaper by not computing what does not matter.

One line to apply a technique, one to undo it::

    handle = mmskip.apply(model, mmskip.LayerSkipConfig(schedule=mmskip.schedules.unified(speedup=2.0)))
    handle.stats(); handle.remove()

``import mmskip`` itself is cheap (it imports no torch), so the ``mmskip`` command line starts
at once. The techniques' configs and ``apply`` load together on first attribute access (which
also registers every language technique for ``SkipConfig.from_dict``); they import torch but
not the hook machinery (``diffusers.hooks``), which loads when a technique is first applied.
One folder per language technique, named by its id: ``layer_skip``, ``ffn_skip``,
``void_layers``, ``first_routers`` (FiRST), ``swift`` (SWIFT self-speculative decoding). The subpackages
(``mmskip.diffusion``, ``mmskip.pipelines``, ``mmskip.zoo``, ``mmskip.eval``,
``mmskip.analysis``, ``mmskip.vision``) are imported on first attribute access too.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import analysis, diffusion, eval, pipelines, schedules, vision, zoo  # noqa: F401
    from .ffn_skip import FFNSkipConfig
    from .first_routers import RouterConfig
    from .inject import ConcurrentUseError, SkipConfig, SkipHandle, TechniqueState, applied, apply
    from .layer_skip import LayerSkipConfig
    from .registry import UnsupportedModelError
    from .swift import SelfSpeculativeConfig
    from .tuning import TuneResult, tune
    from .void_layers import VoidLayerConfig

# submodules reachable as attributes (``mmskip.registry.get_adapter``), imported on first access
_LAZY = ("analysis", "diffusion", "eval", "pipelines", "vision", "zoo", "schedules", "registry", "timing",
         "inject", "train", "tuning")

# public name -> the core module that defines it; the first access imports them all (one piece)
_CORE = {
    "apply": "inject", "applied": "inject", "SkipConfig": "inject", "SkipHandle": "inject",
    "TechniqueState": "inject", "ConcurrentUseError": "inject", "LayerSkipConfig": "layer_skip",
    "FFNSkipConfig": "ffn_skip", "VoidLayerConfig": "void_layers", "SelfSpeculativeConfig": "swift",
    "RouterConfig": "first_routers", "UnsupportedModelError": "registry",
}

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
    "tune",
    "TuneResult",
    "analysis", "diffusion", "eval", "pipelines", "vision", "zoo",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _CORE:
        modules = {m: importlib.import_module(f"{__name__}.{m}") for m in dict.fromkeys(_CORE.values())}
        globals().update({n: getattr(modules[m], n) for n, m in _CORE.items()})
        return globals()[name]
    if name in ("tune", "TuneResult"):  # mmskip.tune(...): the function of mmskip.tuning
        module = importlib.import_module(f"{__name__}.tuning")
        globals()[name] = getattr(module, name)
        return globals()[name]
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'mmskip' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_CORE) | {"tune", "TuneResult"})
