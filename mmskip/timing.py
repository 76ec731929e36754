"""One way to time a speedup: paired, interleaved runs with warm-up excluded, median and spread.

A single timing of a sub-second call is noise (a CPU's frequency, another process, the allocator
warming up), so every speed figure mmskip prints (the app, ``mmskip eval``, the demo, the
benchmarks) comes from :func:`paired`: the baseline and each candidate run in interleaved rounds
(the order alternates round by round, so drift hits both alike), the first ``warmup`` rounds are
dropped, and each round's ratio ``baseline / candidate`` is one sample. The reported speedup is
the median ratio, with the lower and upper quartile as its spread. CUDA work is synchronised
before every clock read.

A call that needs untimed work around it (apply and remove a technique, reset a cache) is a
:class:`Candidate` with ``setup``/``teardown`` (and ``minus``, a part timed and subtracted);
:func:`repeated` gives a lone figure's seconds, :func:`once` one call's seconds and result.

:meth:`Timing.bound_warning` says when a measured speedup exceeds the FLOPs bound by more than its
spread allows, which is worth a look (launch-bound models can beat their FLOPs bound; noise can too).

Example::

    from mmskip.timing import paired

    t = paired(lambda: model.generate(**inputs), {"skip": lambda: skip_model.generate(**inputs)})
    print(t["skip"].summary())          # "1.42x (1.35-1.51, 7 pairs)"
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Candidate", "Timing", "once", "paired", "repeated", "sync"]


def sync() -> None:
    """Wait for queued CUDA work (a no-op without CUDA), so a clock read means what it says."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Candidate:
    """A timed call with untimed work around it: ``setup()`` before each timed ``call()``,
    ``teardown()`` after it (also when the call raises).

    For a call that needs per-run preparation that must not be timed and must not leak into the other
    calls of the round: apply a technique and remove it again, reset a cache, reseed. Either may be
    ``None``. Plain callables passed to :func:`paired` / :func:`repeated` mean ``Candidate(call)``.

    ``minus``, when given, is timed too (right before ``call``, inside the same setup) and its seconds
    are subtracted: the time of the part of ``call`` that ``minus`` does not do, e.g. decode alone as
    ``generate(N tokens) - generate(1 token)``.
    """

    call: Callable[[], Any]
    setup: Callable[[], Any] | None = None
    teardown: Callable[[], Any] | None = None
    minus: Callable[[], Any] | None = None


Timed = Callable[[], Any] | Candidate


def _seconds(fn: Callable[[], Any]) -> tuple[float, Any]:
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def _clock(fn: Timed) -> tuple[float, Any]:
    """Seconds of one call (CUDA synced both sides); a :class:`Candidate`'s setup/teardown run untimed."""
    c = fn if isinstance(fn, Candidate) else Candidate(fn)
    if c.setup is not None:
        c.setup()
    try:
        ref = _seconds(c.minus)[0] if c.minus is not None else 0.0
        secs, out = _seconds(c.call)
        return secs - ref, out
    finally:
        if c.teardown is not None:
            c.teardown()


def _quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


@dataclass(frozen=True)
class Timing:
    """One candidate against the baseline: seconds per round for each, and the paired ratios.

    Attributes:
        baseline_s: the baseline's seconds in each measured round (warm-up excluded).
        candidate_s: the candidate's seconds in the same rounds.
    """

    baseline_s: tuple[float, ...]
    candidate_s: tuple[float, ...]

    @property
    def ratios(self) -> list[float]:
        """``baseline / candidate`` per round: > 1 means the candidate is faster."""
        return [b / c for b, c in zip(self.baseline_s, self.candidate_s)]

    @property
    def speedup(self) -> float:
        """The median paired ratio."""
        return statistics.median(self.ratios)

    @property
    def spread(self) -> tuple[float, float]:
        """Lower and upper quartile of the paired ratios."""
        return _quartiles(self.ratios)

    @property
    def seconds(self) -> float:
        """The candidate's median seconds per call."""
        return statistics.median(self.candidate_s)

    @property
    def baseline_seconds(self) -> float:
        """The baseline's median seconds per call."""
        return statistics.median(self.baseline_s)

    @property
    def pairs(self) -> int:
        return len(self.candidate_s)

    def summary(self) -> str:
        """``"1.42x (1.35-1.51, 7 pairs)"``: median speedup, its quartiles, the number of pairs."""
        lo, hi = self.spread
        return f"{self.speedup:.2f}x ({lo:.2f}-{hi:.2f}, {self.pairs} pairs)"

    def bound_warning(self, flops_fraction: float | None) -> str | None:
        """A sentence when the speedup exceeds ``1 / flops_fraction`` by more than the spread
        allows (its lower quartile is above the bound), else ``None``."""
        if not flops_fraction or flops_fraction <= 0:
            return None
        bound = 1.0 / flops_fraction
        lo, _ = self.spread
        if lo > bound * 1.05:
            return (f"measured {self.speedup:.2f}x (lower quartile {lo:.2f}x) exceeds the FLOPs bound "
                    f"{bound:.2f}x: the timing is noisy, or the model is bound by overheads rather than FLOPs")
        return None

    def to_dict(self, flops_fraction: float | None = None) -> dict[str, Any]:
        """The median speedup, its quartiles, the pairs and both medians in seconds; given the
        technique's ``flops_fraction``, also the FLOPs bound beside it and :meth:`bound_warning`."""
        lo, hi = self.spread
        out = {"speedup": self.speedup, "spread": [lo, hi], "pairs": self.pairs, "seconds": self.seconds,
               "baseline_seconds": self.baseline_seconds}
        if flops_fraction is not None:
            out["flops_bound"] = 1.0 / flops_fraction if flops_fraction > 0 else None
            out["bound_warning"] = self.bound_warning(flops_fraction)
        return out


def paired(baseline: Timed, candidates: Mapping[str, Timed], repeats: int = 5,
           warmup: int = 1, progress: Callable[[int, int], None] | None = None) -> dict[str, Timing]:
    """Time ``baseline`` against each candidate in ``repeats`` interleaved rounds after ``warmup``.

    Args:
        baseline: the unmodified call (no arguments; wrap yours in a lambda), or a :class:`Candidate`.
        candidates: name -> the accelerated call. A candidate that must apply a technique around
            its call does so inside the callable (``with mmskip.applied(model, cfg): ...``), or is a
            :class:`Candidate` whose untimed ``setup``/``teardown`` run around every timed call.
        repeats: measured rounds (each gives one ratio per candidate); at least 3.
        warmup: rounds run first and dropped (compilation, allocator, caches).
        progress: called with (round done, rounds in all) after every round.

    Returns:
        name -> :class:`Timing`. Within a round the baseline runs both before and after the
        candidates on alternate rounds, so a slow drift of the machine cancels out.
    """
    if repeats < 3:
        raise ValueError(f"paired() needs repeats >= 3 to give a median and a spread, got {repeats}")
    if warmup < 0:
        raise ValueError(f"paired(): warmup must be >= 0, got {warmup}")
    if not candidates:
        raise ValueError("paired(): give at least one candidate to time against the baseline")
    names = list(candidates)
    base: list[float] = []
    cand: dict[str, list[float]] = {n: [] for n in names}
    total = warmup + repeats
    for r in range(total):
        before = r % 2 == 0  # the baseline runs first on even rounds, last on odd ones
        base_t = _clock(baseline)[0] if before else 0.0
        times = {n: _clock(candidates[n])[0] for n in (names if before else names[::-1])}
        if not before:
            base_t = _clock(baseline)[0]
        if r >= warmup:
            base.append(base_t)
            for n in names:
                cand[n].append(times[n])
        if progress is not None:
            progress(r + 1, total)
    return {n: Timing(tuple(base), tuple(cand[n])) for n in names}


def repeated(fn: Timed, repeats: int = 5, warmup: int = 1) -> tuple[float, ...]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` dropped calls (CUDA synced).

    For a figure with no baseline to pair with (a baseline's own tokens/s when no candidate is
    given); report its median. ``fn`` may be a :class:`Candidate` (untimed setup/teardown around each
    call). A speedup is always :func:`paired`, never a ratio of two of these.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeated() needs repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    for _ in range(warmup):
        _clock(fn)
    return tuple(_clock(fn)[0] for _ in range(repeats))


def once(fn: Timed) -> tuple[float, Any]:
    """Seconds and result of one call of ``fn`` (CUDA synced; a :class:`Candidate`'s setup/teardown untimed).

    For a lone, indicative figure that also needs the call's output (a quality run's wall time, a
    compile's first call); never a speedup, which is :func:`paired`.
    """
    return _clock(fn)
