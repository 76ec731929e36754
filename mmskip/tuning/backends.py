"""Where ``mmskip.tune``'s calibration trials run: in this process, or on Ray actors.

The Optuna study always stays in the calling process: it asks for a round of ``workers`` trials,
the backend measures them (quality and FLOPs on the calibration inputs), and the study is told the
results in trial order. Measurements are deterministic (FLOPs, not seconds), so a round measured on
Ray gives exactly what the same round measured here gives: ``backend="ray"`` changes where the
trials run, never which trials run or what the search finds. Held-out confirmation (the wall-time
figures) always runs here, on the caller's device.

Ray (``pip install 'mmskip[ray]'``) runs one actor per worker; each actor receives the target once
(through Ray's object store) and measures the candidates it is handed. We drive actors from the
study's ask/tell loop rather than through ``ray.tune.Tuner``: Tune owns the trial loop and reports
results in completion order, which would make a distributed search differ from a local one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .space import Candidate

__all__ = ["Evaluator", "LocalEvaluator", "RayEvaluator", "check_backend", "make_evaluator", "BACKENDS"]

logger = logging.getLogger(__name__)

BACKENDS = ("local", "ray")


def measure(target: Any, candidate: Candidate, calib: list[Any], reference: Any, score: Callable, metric: str,
            base_flops: float, base_s: float) -> dict[str, Any]:
    """The calibration fields of one candidate: ``q``, ``quality``, ``cost`` (FLOPs fraction) and
    ``seconds``; ``q=None`` and ``error`` for a setting the target cannot run; ``fatal`` for a
    :class:`~mmskip.tuning.search.TuneError` (a metric that raises), which stops the search."""
    from .search import TuneError, _run

    try:
        out, flops, secs, forwards = _run(target, candidate, calib)
        quality = score(out, reference)
    except TuneError as e:
        return {"fatal": str(e)}
    except (ValueError, TypeError, RuntimeError, NotImplementedError) as e:  # a setting that does not fit
        return {"q": None, "error": f"{type(e).__name__}: {e}"}
    # speculative decoding saves forwards, not FLOPs: it is ranked by its forwards
    cost = forwards if forwards is not None else flops / base_flops if base_flops else secs / base_s
    return {"q": quality[metric], "quality": quality, "cost": cost, "seconds": secs,
            **({"forward_cost": forwards} if forwards is not None else {})}


class Evaluator:
    """Measures rounds of candidates; ``workers`` is how many trials a round holds."""

    workers: int = 1

    def map(self, candidates: list[Candidate]) -> list[dict[str, Any]]:
        """The :func:`measure` fields of each candidate, in order."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the backend holds (actors, a cluster it started)."""


class LocalEvaluator(Evaluator):
    """Measures each candidate of a round in turn, in this process."""

    def __init__(self, target: Any, calib: list[Any], reference: Any, score: Callable, metric: str,
                 base_flops: float, base_s: float, workers: int = 1) -> None:
        self.args = (calib, reference, score, metric, base_flops, base_s)
        self.target, self.workers = target, workers

    def map(self, candidates: list[Candidate]) -> list[dict[str, Any]]:
        return [measure(self.target, c, *self.args) for c in candidates]


class _Worker:
    """A Ray actor: holds one copy of the target and measures the candidates sent to it."""

    def __init__(self, payload: tuple[Any, ...]) -> None:
        from .search import _scorer

        target, self.calib, self.reference, metric_arg, self.base_flops, self.base_s = payload
        self.target = target
        self.metric, self.score = _scorer(target, metric_arg)

    def measure(self, candidate: Candidate) -> dict[str, Any]:
        return measure(self.target, candidate, self.calib, self.reference, self.score, self.metric,
                       self.base_flops, self.base_s)


class RayEvaluator(Evaluator):
    """Measures a round's candidates in parallel on ``workers`` Ray actors (one CPU each).

    ``address``: a running cluster's address (``"auto"``, ``"ray://host:10001"``); by default a
    local cluster with ``workers`` CPUs is started and shut down again by :meth:`close`.
    """

    def __init__(self, target: Any, calib: list[Any], reference: Any, metric_arg: Any, base_flops: float,
                 base_s: float, workers: int = 2, address: str | None = None) -> None:
        from ..optional_deps import require

        ray = require("ray", "mmskip.tune(backend='ray')")
        from ray.util import ActorPool

        self._ray, self.workers, self._owns = ray, workers, False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"address": address} if address else {"num_cpus": workers}
            ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING, **kwargs)
            self._owns = True
        payload = ray.put((target, calib, reference, metric_arg, base_flops, base_s))
        actor = ray.remote(num_cpus=1)(_Worker)
        self._actors = [actor.remote(payload) for _ in range(workers)]
        self._pool = ActorPool(self._actors)
        logger.info("tune: %d Ray workers (%s)", workers, address or "local cluster")

    def map(self, candidates: list[Candidate]) -> list[dict[str, Any]]:
        return list(self._pool.map(lambda actor, c: actor.measure.remote(c), candidates))

    def close(self) -> None:
        for a in self._actors:
            self._ray.kill(a)
        self._actors = []
        if self._owns:
            self._ray.shutdown()


def check_backend(backend: str, workers: int | None, address: str | None) -> None:
    """Raise :class:`~mmskip.tuning.search.TuneError` (or ``ImportError`` naming the extra) for settings
    :func:`make_evaluator` cannot serve; called before any model runs."""
    from ..optional_deps import require
    from .search import TuneError

    if backend not in BACKENDS:
        raise TuneError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise TuneError(f"workers must be a positive int (trials measured per round), got {workers!r}")
    if address is not None and backend != "ray":
        raise TuneError("ray_address is for backend='ray'; add backend='ray' (CLI: --backend ray)")
    if backend == "ray":
        require("ray", "mmskip.tune(backend='ray')")


def make_evaluator(backend: str, target: Any, calib: list[Any], reference: Any, score: Callable, metric_arg: Any,
                   metric: str, base_flops: float, base_s: float, workers: int | None,
                   address: str | None) -> Evaluator:
    """The evaluator for ``backend`` (``"local"`` or ``"ray"``; checked by :func:`check_backend`)."""
    if backend == "ray":
        return RayEvaluator(target, calib, reference, metric_arg, base_flops, base_s, workers or 2, address)
    return LocalEvaluator(target, calib, reference, score, metric, base_flops, base_s, workers or 1)
