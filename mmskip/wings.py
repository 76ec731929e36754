"""The wings (``mmskip.vision``, ``mmskip.diffusion``, third-party plugins) found through package
metadata, so the core can ask for them without naming them.

A wing declares itself in its distribution's entry points, group ``mmskip.wings``
(``pyproject.toml``: ``[project.entry-points."mmskip.wings"]``); importing it registers what the
core needs (its configs with ``SkipConfig``, its zoo loaders with ``mmskip.zoo.register_loader``,
its model adapters). :func:`load_wings` imports every declared wing once; a wing whose
dependencies are missing is skipped with a debug log line.
"""

from __future__ import annotations

import functools
import logging
from importlib.metadata import entry_points

__all__ = ["load_wings", "load_techniques"]

GROUP = "mmskip.wings"
logger = logging.getLogger(__name__)


@functools.cache
def load_wings() -> tuple[str, ...]:
    """Import every wing declared under the ``mmskip.wings`` entry-point group; returns the names of
    those that loaded."""
    loaded = []
    for ep in entry_points(group=GROUP):
        try:
            ep.load()
        except ImportError as e:  # a wing whose dependencies are missing has nothing to offer
            logger.debug("wing %s (%s) not loaded: %s", ep.name, ep.value, e)
            continue
        loaded.append(ep.name)
    return tuple(loaded)


def load_techniques() -> tuple[str, ...]:
    """Register every technique: the core's language techniques (imported with ``mmskip``'s
    public names) and every wing's (:func:`load_wings`); returns the wings that loaded."""
    import mmskip

    mmskip.SkipConfig  # noqa: B018  (the first public name imports every core technique)
    return load_wings()
