"""Stock inputs for the zoo's image pipelines: digits or captions with a seed each, disjoint by range.

``mmskip tune``, the app's Tune tab, the demo and ``benchmarks/tune.py`` take calibration inputs
``0 .. n-1`` and held-out inputs ``n .. 2n-1``; each input carries its own seed, so two inputs with
the same caption are still different samples.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["zoo_inputs"]

logger = logging.getLogger(__name__)


def zoo_inputs(name: str, n: int, offset: int = 0) -> list[dict[str, Any]] | None:
    """``n`` call-argument dicts (``prompt`` or ``class_labels``, and ``seed``) for zoo image pipeline
    ``name`` starting at ``offset``; ``None`` for a model whose tuning target has its own stock inputs."""
    if name == "digits-dit":  # class-conditional: the ten digits (its embedding table is larger than that)
        return [{"class_labels": [(offset + i) % 10], "seed": offset + i} for i in range(n)]
    if name == "digits-sd":
        from .data import caption

        return [{"prompt": caption((offset + i) % 10), "guidance_scale": 4.0, "seed": offset + i} for i in range(n)]
    if name == "scenes-flux":
        from .scenes_data import SAMPLING, make_split

        captions = make_split("test", offset + n)[1]
        return [{"prompt": captions[offset + i], **SAMPLING, "negative_prompt": "", "seed": offset + i}
                for i in range(n)]
    return None
