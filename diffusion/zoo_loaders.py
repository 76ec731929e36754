"""The zoo models made of this wing's classes, registered with :func:`mmskip.zoo.register_loader`.

``scenes-flux-controlnet`` and ``scenes-flux-relactrl`` are ``FluxControlNetPipeline`` folders whose
control branch may be a :class:`~mmskip.diffusion.relactrl.RelaCtrlFluxNet`; the zoo cannot import
this wing, so the wing registers their loader when it is imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmskip import zoo

__all__ = ["load_control_pipeline"]


def load_control_pipeline(folder: Path, **kwargs: Any) -> Any:
    """``scenes-flux`` with the control branch saved in ``folder`` (float32 unless ``dtype`` given)."""
    from mmskip.zoo.loaders import pop_dtype

    from .relactrl.recipe import load_pipeline

    return load_pipeline(folder, dtype=pop_dtype(kwargs), **kwargs)


for _name in ("scenes-flux-controlnet", "scenes-flux-relactrl"):
    zoo.register_loader(_name, load_control_pipeline)
