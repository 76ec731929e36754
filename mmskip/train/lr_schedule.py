"""The one learning-rate shape every trainer uses: linear warm-up, then cosine decay to a floor.

``warmup_cosine`` returns a factor of the peak learning rate (multiply ``lr`` by it, or hand it
to ``torch.optim.lr_scheduler.LambdaLR``). The trainers of this project use two forms of it,
kept apart by ``decay_after_warmup`` so each keeps its exact numbers:

* overlapped (default): the cosine runs over the whole run from step 0, and the warm-up ramp
  multiplies it (``mmskip.train``, MuE's layer-wise trainer, the LLaVA / video / stdlib-LM recipes);
* sequential: the ramp alone during warm-up, then the cosine over the steps after it
  (RelaCtrl's control branch, assembly distillation, SkipPipe on its share-of-run progress).
"""

import logging
import math

logger = logging.getLogger(__name__)


def warmup_cosine(step: float, total: float, warmup: float = 0, floor: float = 0.0, *,
                  decay_after_warmup: bool = False, count_from: float = 1, ramp_min: float = 0.0) -> float:
    """Learning-rate factor at ``step``: linear warm-up over ``warmup``, cosine decay to ``floor``.

    Args:
        step: the step now (0-based), or any progress measure in the same unit as ``total``.
        total: where the cosine reaches ``floor`` (steps, or 1.0 for a share of the run); the
            cosine holds at ``floor`` beyond it.
        warmup: warm-up length in the unit of ``step``; 0 (or less): no warm-up.
        floor: the factor the cosine ends at (1.0: flat after warm-up).
        decay_after_warmup: False: cosine progress is ``step / total`` and the ramp multiplies it;
            True: the ramp alone while ``step < warmup``, then cosine progress
            ``(step - warmup) / (total - warmup)``.
        count_from: the ramp is ``(step + count_from) / warmup`` (1: step 0 already trains at
            ``1 / warmup`` of the peak; 0 for a progress measure that starts at 0).
        ramp_min: lower bound of the ramp (SkipPipe's 1 % at progress 0).
    """
    ramp = max(min(1.0, (step + count_from) / warmup), ramp_min) if warmup > 0 else 1.0
    if decay_after_warmup:
        if step < warmup:
            return ramp
        progress = min(1.0, (step - warmup) / (total - warmup)) if total > warmup else 1.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    progress = min(1.0, step / total)
    return ramp * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
