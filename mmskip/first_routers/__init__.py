"""FiRST: trained per-layer routers pick, from the prompt, which layers to skip (https://arxiv.org/abs/2410.12513).

``config`` (:class:`RouterConfig`; technique id ``first_routers``), ``state``
(:class:`RouterState`), ``routers`` (the :class:`Router` / :class:`Routers` modules and their
folder format), ``hooks`` (the router hook and the attach; imported when a config is applied).
Routers are trained by ``python -m mmskip.train.first`` (:mod:`mmskip.train`).
"""

from __future__ import annotations

from .config import RouterConfig
from .routers import Router, Routers
from .state import RouterState

__all__ = ["Router", "Routers", "RouterConfig", "RouterState"]
