"""Non-uniform step schedules for diffusion, built on the shared scheduler's ``explicit`` keep set.

Early denoising steps commit to the layout and change the sample fastest ("outline first,
details later", Wang & Vastola, 2023), so recomputes are placed more densely there.

Step indices are those of the pipeline's ``num_inference_steps`` grid: ``nonuniform(50, 14)`` is for
50-step calls (also when step skipping or the teleport make the sampler visit fewer of them).
"""

from __future__ import annotations

from collections.abc import Sequence

from mmskip.schedules import ExplicitSchedule, explicit

__all__ = ["nonuniform", "from_changes"]


def nonuniform(num_steps: int, num_compute: int, power: float = 2.0) -> ExplicitSchedule:
    """Recompute ``num_compute`` of ``num_steps`` steps, denser at the start for ``power > 1``.

    Step ``i`` of the keep set is ``round((num_steps - 1) * (i / (num_compute - 1)) ** power)``
    (collisions are moved to the next free step); ``power=1`` is uniform, the first and the last
    step are always kept.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"nonuniform(): num_steps must be an integer >= 1, got {num_steps!r}")
    if not isinstance(num_compute, int) or not 1 <= num_compute <= num_steps:
        raise ValueError(f"nonuniform(): num_compute must lie in 1..{num_steps}, got {num_compute!r}")
    if power <= 0:
        raise ValueError(f"nonuniform(): power must be > 0, got {power}")
    if num_compute == 1:
        return explicit(keep=[0], num=num_steps)
    keep: list[int] = []
    for i in range(num_compute):
        k = round((num_steps - 1) * (i / (num_compute - 1)) ** power)
        k = max(k, keep[-1] + 1 if keep else 0)
        keep.append(k)
    # pushed past the end: pull back from the top, keeping them distinct
    for j in range(len(keep) - 1, -1, -1):
        limit = num_steps - 1 if j == len(keep) - 1 else keep[j + 1] - 1
        keep[j] = min(keep[j], limit)
    return explicit(keep=keep, num=num_steps)


def from_changes(changes: Sequence[float], num_compute: int) -> ExplicitSchedule:
    """A keep set that splits the measured per-step change evenly between recomputes.

    ``changes[i]`` is how much the features move at step ``i`` (e.g. the relative change of the
    adaptive probe, ``handle.stats()`` of a calibration run with ``adaptive(threshold=0)``).
    A recompute is placed whenever the change accumulated since the last one reaches
    ``sum(changes) / num_compute``; step 0 is always kept.
    """
    n = len(changes)
    if n == 0:
        raise ValueError("from_changes(): need at least one step's change")
    if not 1 <= num_compute <= n:
        raise ValueError(f"from_changes(): num_compute must lie in 1..{n}, got {num_compute}")
    if any(c < 0 for c in changes):
        raise ValueError("from_changes(): changes must be >= 0")
    budget = sum(changes[1:]) / num_compute if n > 1 else 0.0
    keep, acc = [0], 0.0
    for i in range(1, n):
        acc += changes[i]
        if len(keep) < num_compute and acc >= budget and budget > 0:
            keep.append(i)
            acc = 0.0
    return explicit(keep=keep, num=n)
