"""Optional dependencies (pip extras): imported where they are used, with a message naming the extra to install.

``pip install mmskip`` stays lean; ``mmskip[eval]`` adds torchmetrics, open_clip_torch and
scikit-learn (FID, PSNR/SSIM, CLIP score, the digits data), ``mmskip[analysis]`` adds matplotlib.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "require", "missing_extra"]

# top-level module -> (pip distribution, mmskip extra that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "torchmetrics": ("torchmetrics", "eval"),
    "open_clip": ("open_clip_torch", "eval"),
    "sklearn": ("scikit-learn", "eval"),
    "matplotlib": ("matplotlib", "analysis"),
    "peft": ("peft", "lora"),
    "optuna": ("optuna", "tune"),
    "ray": ("ray", "ray"),
}


def missing_extra(error: ModuleNotFoundError, feature: str) -> ImportError | None:
    """An ``ImportError`` saying which extra to install when ``error`` is a missing optional
    dependency, else ``None`` (re-raise the original)."""
    top = (error.name or "").split(".")[0]
    if top not in EXTRAS:
        return None
    dist, extra = EXTRAS[top]
    return ImportError(f"{feature} needs {dist}, an optional dependency: pip install 'mmskip[{extra}]'")


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` (e.g. ``"torchmetrics.image.fid"``), or raise ``ImportError`` naming the extra."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        err = missing_extra(e, feature)
        if err is None:
            raise
        raise err from e
