"""The ``mmskip.tune`` entry point: validate, search on calibration inputs, confirm on held-out ones."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .backends import check_backend, make_evaluator
from .result import Measured, TuneResult
from .search import TuneError, _finalists, _run, _scorer, _Search, parse_budget
from .space import Candidate
from .target import make_target
from .trial_log import TrialLog, digest, weights_digest

__all__ = ["tune"]

logger = logging.getLogger(__name__)


def _split(inputs: list[Any]) -> tuple[list[Any], list[Any]]:
    if len(inputs) < 2:
        raise TuneError("give held_out= inputs, or at least 2 inputs to split into calibration and held-out halves")
    half = (len(inputs) + 1) // 2
    return inputs[:half], inputs[half:]


def _held_out_baseline(target: Any, held: list[Any], score: Callable) -> tuple[Measured, Any, float]:
    """The baseline on the held-out inputs, measured once: its entry, its outputs (the reference every
    finalist is scored against) and its FLOPs."""
    base = target.baseline()
    ref, base_flops, _, _ = _run(target, base, held)
    with target.applied(base):
        base_extra = target.extra_metrics(held)
    return Measured(base, {**score(ref, ref), **base_extra}, flops_fraction=1.0 if base_flops else None), ref, base_flops


def _confirm(target: Any, records: list[dict[str, Any]], held: list[Any], base: Measured, ref: Any, base_flops: float,
             score: Callable, metric: str, repeats: int, progress: bool, timed: int) -> list[Measured]:
    """Re-score each finalist on the held-out inputs against ``ref`` and time it against the baseline
    (paired) on the first ``timed`` of them (wall time needs repeated rounds, quality one pass);
    ``base`` gets the baseline's seconds."""
    from ..timing import paired

    measured = []
    bar = tqdm(records, desc="tune: confirm on held-out", disable=not progress, unit="candidate")
    for rec in bar:
        cand = Candidate.from_dict(rec["candidate"])
        bar.set_postfix_str(cand.label[:40])
        out, flops, _, forwards = _run(target, cand, held)
        with target.applied(cand):
            extra = target.extra_metrics(held)
        with target.timing_pair(cand, held[:timed]) as (run_base, run_cand):
            t = paired(run_base, {"c": run_cand}, repeats=repeats, warmup=1)["c"]
        measured.append(Measured(cand, {**score(out, ref), **extra}, t.speedup, t.spread,
                                 flops / base_flops if base_flops else None, t.seconds, t.baseline_seconds,
                                 {metric: rec["q"], "cost": rec["cost"]}, forwards))
        base.seconds = base.baseline_seconds = t.baseline_seconds
    return measured


COST_MODEL = "flops; forwards for speculative decoding"  # what a trial's "cost" is (the trial log's header)

ESCALATIONS = 2  # rounds of re-confirming a safer candidate per group that missed the floor held-out


def _escalate(records: list[dict[str, Any]], chosen: list[dict[str, Any]], measured: list[Measured], metric: str,
              floor: float) -> list[dict[str, Any]]:
    """For each technique / family whose finalists met ``floor`` on calibration inputs but all missed it
    on held-out ones, its cheapest untried candidate with a higher calibration quality than any tried.
    Calibration quality runs optimistic by a model- and floor-dependent gap (4 dB on ``scenes-flux``),
    which no fixed margin covers."""
    group = {r["key"]: r["group"] for r in chosen}
    passed = {group.get(m.candidate.key) for m in measured[1:] if m.quality.get(metric, -math.inf) >= floor}
    tried = set(group)
    out = []
    for g in sorted(set(group.values()) - passed):
        bar = max(r["q"] for r in chosen if r["group"] == g)
        if bar < floor:
            continue  # only picked for the picture
        nxt = min((r for r in records if r.get("q") is not None and r["group"] == g and r["q"] > bar
                   and r["key"] not in tried), key=lambda r: r["cost"], default=None)
        if nxt is not None:
            out.append(nxt)
            tried.add(nxt["key"])
    return out


def tune(target: Any, inputs: Sequence[Any], floor: float | None = None, budget: int | str | float | timedelta = "5m",
         held_out: Sequence[Any] | None = None, metric: str | Callable[[Any, Any], float] | None = None,
         out: str | Path | None = None, seed: int = 0, finalists: int = 6, repeats: int = 5, progress: bool = True,
         backend: str = "local", workers: int | None = None, ray_address: str | None = None,
         timed_inputs: int = 4, **target_options: Any) -> TuneResult:
    """Find the fastest configuration of ``target`` whose quality on ``held_out`` meets ``floor``.

    Args:
        target: a causal LM, a diffusers pipeline, a VLM, or a :class:`~mmskip.tuning.TuneTarget`.
        inputs: calibration inputs (prompts; a pipeline's prompts or call-argument dicts).
        floor: the quality the result must keep, on ``metric`` (default: the target's, e.g. 1.0
            agreement for a causal LM: lossless).
        budget: trials (an int) or search time (``"10m"``, ``"90s"``); confirming the finalists comes after.
        held_out: inputs the reported figures come from (default: the second half of ``inputs``).
        metric: the target's metric name (``"agreement"``, ``"psnr"``, ...) or a callable
            ``metric(outputs, reference) -> float`` (higher is better).
        out: folder for the trial log (``trials.jsonl``); rerunning with it continues the search.
        seed: the sampler's seed (targets seed their own generation).
        finalists: how many calibration-front candidates are confirmed on the held-out inputs.
        repeats: paired timing rounds per finalist (after one warm-up round).
        backend: where calibration trials run: ``"local"`` (this process) or ``"ray"`` (Ray actors,
            ``pip install 'mmskip[ray]'``). The search is the same on both; held-out timing runs here.
        workers: trials measured per round (Ray: that many actors; default 2). Local rounds of the
            same size measure one trial after another and find exactly what Ray finds.
        ray_address: a running Ray cluster (``"auto"``); default: start a local one with ``workers`` CPUs.
        timed_inputs: how many of the held-out inputs the paired wall-time rounds run (quality is
            scored on all of them); default 4.
        target_options: passed to the target (e.g. ``tokenizer=``, ``max_new_tokens=``).
    """
    t_start = time.perf_counter()
    trials, seconds = parse_budget(budget)
    if finalists < 1 or repeats < 3 or timed_inputs < 1:
        raise TuneError(f"finalists and timed_inputs must be >= 1 and repeats >= 3, got {finalists}, "
                        f"{timed_inputs} and {repeats}")
    from ..optional_deps import require

    require("optuna", "mmskip.tune")
    check_backend(backend, workers, ray_address)
    t = make_target(target, **target_options)
    calib = t.check_inputs(inputs, "inputs")
    held = t.check_inputs(held_out, "held_out") if held_out is not None else None
    if held is None:
        calib, held = _split(calib)
    name, score = _scorer(t, metric)
    floor = t.default_floor if floor is None else floor
    if not isinstance(floor, (int, float)) or math.isnan(floor):
        raise TuneError(f"floor must be a number on {name!r}, got {floor!r}")

    reference, base_flops, base_s, _ = _run(t, t.baseline(), calib)
    score(reference, reference)  # a metric that raises fails here, before any search
    if seconds is not None and seconds < 2 * base_s:
        raise TuneError(f"budget {budget!r} is too small: one run of the calibration inputs takes {base_s:.1f} s; "
                        f"give at least {math.ceil(2 * base_s)} s, or fewer inputs")
    # the floor only picks the finalists: runs at other floors share (and extend) one search
    header = {"target": type(t.model).__name__, "kind": t.kind, "metric": name, "seed": seed,
              "inputs": len(calib), "held_out": len(held), "inputs_digest": digest(calib), "flops": base_flops,
              "weights": weights_digest(t.model),  # retrained weights of the same shapes: a new search
              "cost": COST_MODEL}  # logs whose costs were measured otherwise are not continued
    log = TrialLog(out, header)
    evaluator = make_evaluator(backend, t, calib, reference, score, metric, name, base_flops, base_s, workers,
                               ray_address)
    try:
        search = _Search(t, evaluator, name, float(floor), log, seed)
        search.measure([(cand, "fixed", cand.family, None) for cand in t.fixed_candidates()])
        n = search.run(trials, seconds, progress)
    except KeyboardInterrupt:
        where = f"; the trial log is kept in {log.path}: rerun with out={str(out)!r} to continue" if log.path else ""
        logger.warning("tuning interrupted after %d logged trials%s", len(log.records), where)
        raise
    finally:
        evaluator.close()
    chosen = _finalists(search.records, float(floor), finalists)
    base, ref, held_flops = _held_out_baseline(t, held, score)
    confirm = dict(held=held, base=base, ref=ref, base_flops=held_flops, score=score, metric=name, repeats=repeats,
                   progress=progress, timed=timed_inputs)
    measured = [base, *_confirm(t, chosen, **confirm)]
    for _ in range(ESCALATIONS):  # a group whose finalists all missed the floor held-out sends a safer one
        more = _escalate(search.records, chosen, measured, name, float(floor))
        if not more:
            break
        chosen += more
        measured += _confirm(t, more, **confirm)
    ok = [m for m in measured[1:] if m.quality[name] >= floor]
    # faster means faster in most paired rounds: the lower quartile of the ratios is above 1
    best = max((m for m in ok if m.spread[0] > 1.0), key=lambda m: m.speedup, default=None)
    fastest = max(ok, key=lambda m: m.speedup, default=None)
    if fastest is None:
        msg = (f"no candidate keeps {name} >= {floor:g} on the held-out inputs; the baseline is returned "
               f"(the front shows the best trade-offs measured)")
        best = base
    elif best is None:
        msg = (f"none faster than the baseline at {name} >= {floor:g}: the fastest candidate meeting it ran at "
               f"{fastest.speedup:.2f}x ({fastest.spread[0]:.2f}-{fastest.spread[1]:.2f}), not above 1 in most "
               "paired rounds; the baseline is returned")
        best = base
    else:
        msg = (f"{best.candidate.label}: {best.speedup:.2f}x ({best.spread[0]:.2f}-{best.spread[1]:.2f}) at "
               f"{name} {best.quality[name]:.3g} (floor {floor:g}), held-out")
    logger.info("tune: %s", msg)
    return TuneResult(best.candidate, name, float(floor), measured, msg, n, time.perf_counter() - t_start,
                      type(t.model).__name__, {"calibration_inputs": len(calib), "held_out_inputs": len(held),
                                               "repeats": repeats, "timed_inputs": min(timed_inputs, len(held)),
                                               "seed": seed, "backend": backend,
                                               "workers": evaluator.workers})
