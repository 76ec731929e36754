"""``mmskip.tune``: the fastest configuration under a quality floor, on the user's model, data and device.

Two stages, with calibration and held-out inputs kept apart:

1. **Search** (calibration inputs): Optuna's multi-objective TPE sampler (seeded) proposes a
   technique and its declared fields (``SkipConfig.search_space``) plus the target's settings
   (diffusion: steps, sampler); each trial runs once under ``torch.utils.flop_counter`` and is
   scored on two objectives: quality against the baseline (higher is better) and the measured
   FLOPs fraction (lower is better). FLOPs rank candidates cheaply and deterministically.
   Speculative decoding saves sequential forwards, not FLOPs (its verifications recompute what
   plain decoding computes, plus the drafts), so its cost is its forwards per token instead
   (:meth:`~mmskip.inject.TechniqueState.forward_cost`, also deterministic). The
   target's fixed candidates (fewer steps, peers) are always measured too. TPE rather than NSGA-II:
   a budget of tens of trials is smaller than one NSGA-II population, and the space is
   conditional (each technique has its own fields), which TPE's ``group`` mode models.
2. **Confirm** (held-out inputs): the finalists (the calibration front meeting the floor, the
   cheapest of each technique and family, and the best points just under the floor) are re-scored
   and timed against the baseline with :func:`mmskip.timing.paired` (interleaved, warm-up dropped,
   median and quartiles). The best is the fastest finalist whose held-out quality meets the floor;
   if none is faster than the baseline, the baseline is returned with a message saying so.

Every trial is appended to ``out/trials.jsonl``: rerunning with the same ``out`` continues a
stopped search (Ctrl-C keeps the log).
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from tqdm.auto import tqdm

from .backends import Evaluator
from .space import Candidate, Choice, Space, describe
from .target import TuneTarget
from .trial_log import TrialLog

__all__ = ["parse_budget", "TuneError"]

logger = logging.getLogger(__name__)


class TuneError(ValueError):
    """A tuning request that cannot run (bad inputs, a metric that raises, a budget too small)."""


def parse_budget(budget: int | str | float | timedelta) -> tuple[int | None, float | None]:
    """``(trials, seconds)``: an int is a number of trials; ``"10m"``, ``"90s"``, ``"1h30m"`` or a
    ``timedelta`` (or a float of seconds) is wall time for the search."""
    if isinstance(budget, bool):
        raise TuneError(f"budget must be trials (an int) or time ('10m', '90s'), got {budget!r}")
    if isinstance(budget, int):
        if budget < 1:
            raise TuneError(f"budget={budget} trials leaves no trial; give at least 1 (or a time such as '5m')")
        return budget, None
    if isinstance(budget, timedelta):
        budget = budget.total_seconds()
    if isinstance(budget, float):
        if not budget > 0:
            raise TuneError(f"budget must be positive, got {budget}")
        return None, budget
    if isinstance(budget, str):
        text = budget.strip().lower()
        if text.isdigit():
            return parse_budget(int(text))
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", text)
        if text and parts and any(parts.groups()):
            h, m, s = (float(x) if x else 0.0 for x in parts.groups())
            return parse_budget(3600 * h + 60 * m + s)
    raise TuneError(f"budget {budget!r} is neither a number of trials (40) nor a time ('10m', '90s', '1h30m')")


def _scorer(target: TuneTarget, metric: str | Callable[[Any, Any], float] | None) -> tuple[str, Callable]:
    if metric is None or isinstance(metric, str):
        name = metric or target.metric

        def score(out: Any, ref: Any) -> dict[str, float]:
            q = target.quality(out, ref)
            if name not in q:
                raise TuneError(f"metric {name!r} is not one of this target's metrics {sorted(q)}; "
                                "pass one of them or a callable metric(outputs, reference) -> float")
            return q
        return name, score
    if not callable(metric):
        raise TuneError(f"metric must be a name or a callable metric(outputs, reference) -> float, got {metric!r}")
    name = getattr(metric, "__name__", "metric")

    def score_fn(out: Any, ref: Any) -> dict[str, float]:
        try:
            value = float(metric(out, ref))
        except Exception as e:  # a user's metric: say which one failed and how
            raise TuneError(f"the quality metric {name!r} raised {type(e).__name__}: {e}") from e
        return {**target.quality(out, ref), name: value}
    return name, score_fn


def _run(target: TuneTarget, candidate: Candidate, inputs: list[Any]) -> tuple[Any, float, float, float | None]:
    """Outputs and seconds of ``candidate`` on ``inputs``, the FLOPs of a second run of the first
    input under ``torch.utils.flop_counter`` (counting every op costs ~4x, so only that one run pays
    it), and the target's :meth:`~TuneTarget.forward_cost` after both (None for FLOPs-saving techniques)."""
    from torch.utils.flop_counter import FlopCounterMode

    with target.applied(candidate) as applied:
        t0 = time.perf_counter()
        out = target.run(inputs)
        secs = time.perf_counter() - t0
        with FlopCounterMode(display=False) as counter:
            target.run(inputs[:1])
        forwards = target.forward_cost(applied)
    return out, float(counter.get_total_flops()), secs, forwards


def _dominated(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether calibration record ``a`` is dominated by ``b`` (higher quality, lower cost)."""
    return b["q"] >= a["q"] and b["cost"] <= a["cost"] and (b["q"] > a["q"] or b["cost"] < a["cost"])


MARGIN = 0.02  # finalists also include each group's cheapest candidate 2 % above the floor (calibration is noisy)


def _finalists(records: list[dict[str, Any]], floor: float, k: int) -> list[dict[str, Any]]:
    """The calibration candidates confirmed on held-out inputs: the cheapest ``k`` of the front meeting
    ``floor``; per technique / family the cheapest meeting the floor and the cheapest meeting it with
    a margin (``MARGIN`` of the floor: a candidate just over the floor on calibration inputs often
    lands just under it on held-out ones); and the best points just under the floor, for the picture."""
    ok = [r for r in records if r.get("q") is not None]
    front = [r for r in ok if not any(_dominated(r, o) for o in ok)]
    meets = sorted((r for r in front if r["q"] >= floor), key=lambda r: r["cost"])
    chosen = {r["key"]: r for r in meets[:k]}
    safe = floor + MARGIN * abs(floor)
    for group in sorted({r["group"] for r in ok}):
        for bar in (floor, safe):
            best = min((r for r in ok if r["group"] == group and r["q"] >= bar), key=lambda r: r["cost"], default=None)
            if best is not None:
                chosen.setdefault(best["key"], best)
    below = sorted((r for r in front if r["q"] < floor), key=lambda r: -r["q"])
    for r in below[:2 if meets else k]:
        chosen.setdefault(r["key"], r)
    return sorted(chosen.values(), key=lambda r: r["cost"])


def _fits(param: Any, value: Any) -> bool:
    """Whether a seed's ``value`` is one ``param`` can take (seeds outside the space are sampled instead)."""
    if isinstance(param, Choice):
        return value in param.values
    if param is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return param.low <= value <= param.high


class _Search:
    """The calibration stage: fixed candidates, then Optuna trials, every one logged."""

    def __init__(self, target: TuneTarget, evaluator: Evaluator, metric: str, floor: float, log: TrialLog,
                 seed: int) -> None:
        self.t, self.evaluator, self.metric, self.floor, self.log, self.seed = (
            target, evaluator, metric, floor, log, seed)
        self.spaces = {s.technique: s for s in sorted(target.spaces(), key=lambda s: s.technique)}  # import order must not matter
        self.settings = target.settings_space()
        names = list(self.spaces) + (["none"] if self.settings else [])
        if not names:
            raise TuneError(f"nothing to tune on this {type(target.model).__name__}: no technique declares a "
                            "search space for it and it has no settings to vary")
        self.choice = Choice(tuple(names))
        self.records: list[dict[str, Any]] = []

    def measure(self, items: list[tuple[Candidate, str, str, dict[str, Any] | None]]) -> list[dict[str, Any]]:
        """Calibration records of ``(candidate, kind, group, params)`` items, in order. A candidate runs
        once: those not in the log are measured as one round on the evaluator; a repeat (in the log or
        earlier in ``items``) reuses the measurement."""
        todo: dict[str, Candidate] = {}
        for cand, kind, _, _ in items:
            if self.log.find(kind, cand.key) is None:
                todo.setdefault(cand.key, cand)
        fields = dict(zip(todo, self.evaluator.map(list(todo.values()))))
        for f in fields.values():
            if "fatal" in f:
                raise TuneError(f["fatal"])
        records = []
        for cand, kind, group, params in items:
            logged = self.log.find(kind, cand.key)
            if logged is not None:
                if params is None:  # a fixed candidate of a continued search
                    self.records.append(logged)
                    records.append(logged)
                    continue
                rec = {**logged, "params": params}  # a trial that proposed a measured candidate again
            else:
                rec = {"kind": kind, "key": cand.key, "group": group, "candidate": cand.to_dict(),
                       **({"params": params} if params is not None else {}), **fields[cand.key]}
                if rec.get("q") is None:
                    logger.info("candidate %s failed: %s", cand.label, rec.get("error"))
            self.log.append(rec)
            self.records.append(rec)
            records.append(rec)
        return records

    def distributions(self, params: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for name in params:
            if name == "technique":
                out[name] = self.choice.distribution()
            elif name.startswith("setting."):
                out[name] = self.settings[name[8:]].distribution()
            else:
                tech, _, field_name = name.partition(".")
                out[name] = self.spaces[tech].params[field_name].distribution()
        return out

    def suggest(self, trial: Any) -> Candidate:
        tech = self.choice.suggest(trial, "technique")
        values: dict[str, Any] = {}
        space: Space | None = self.spaces.get(tech)
        if space is not None:
            values = {k: p.suggest(trial, f"{tech}.{k}") for k, p in space.params.items()}
        settings = {k: p.suggest(trial, f"setting.{k}") for k, p in self.settings.items()}
        # the build sees the target settings sampled with it (e.g. num_inference_steps, for step schedules)
        built = space.build({**settings, **values}) if space is not None else None  # ValueError: does not fit
        configs: tuple[Any, ...] = ()
        if isinstance(built, dict):  # a peer's settings (e.g. a diffusers cache)
            settings = {**settings, **built}
        elif isinstance(built, tuple):  # techniques applied together (a combined space)
            configs = built
        elif built is not None:
            configs = (built,)
        family = space.family if space is not None else "fewer-steps"
        return Candidate(configs, settings, family, describe(tech, values, settings), dict(trial.params))

    def run(self, trials: int | None, seconds: float | None, progress: bool) -> int:
        import optuna
        from optuna.trial import TrialState, create_trial

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with warnings.catch_warnings():  # multivariate/group are marked experimental; they model our conditional space
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(seed=self.seed, multivariate=True, group=True, n_startup_trials=8)
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
        done = 0
        for r in self.log.records:  # a continued search: the sampler learns from the logged trials
            if r.get("kind") == "trial" and "params" in r:
                ok = r.get("q") is not None
                study.add_trial(create_trial(params=r["params"], distributions=self.distributions(r["params"]),
                                             values=[r["q"], r["cost"]] if ok else self._dominated_values(),
                                             state=TrialState.COMPLETE))
                self.records.append(r)
                done += 1
        if not done:  # a fresh search tries the spaces' declared seeds first
            self._enqueue_seeds(study)
        start, spent = time.perf_counter(), []
        bar = tqdm(total=trials, initial=done, desc="tune: search", disable=not progress, unit="trial")
        try:
            while trials is None or done < trials:
                left = None if seconds is None else seconds - (time.perf_counter() - start)
                if left is not None and left < (sum(spent) / len(spent) if spent else 0.0):
                    break
                t0 = time.perf_counter()
                n = self.evaluator.workers if trials is None else min(self.evaluator.workers, trials - done)
                pending = []
                for trial in [study.ask() for _ in range(n)]:  # one round: measured together, told in order
                    try:
                        pending.append((trial, self.suggest(trial)))
                    except ValueError as e:
                        study.tell(trial, self._dominated_values())
                        self.log.append({"kind": "trial", "key": f"invalid:{trial.number}", "params": trial.params,
                                         "q": None, "error": str(e)})
                        done += 1
                items = [(c, "trial", "+".join(x.technique for x in c.configs) if c.configs else c.family,
                          dict(t.params)) for t, c in pending]
                for (trial, _), rec in zip(pending, self.measure(items)):
                    study.tell(trial, self._dominated_values() if rec.get("q") is None else [rec["q"], rec["cost"]])
                done += len(pending)
                if pending:
                    spent.append(time.perf_counter() - t0)
                    bar.update(len(pending))
                bar.set_postfix_str(self._postfix(left))
        finally:
            bar.close()
        return done

    def _enqueue_seeds(self, study: Any) -> None:
        for tech, space in self.spaces.items():
            for seed in space.seeds:
                params = {"technique": tech, **{f"{tech}.{k}": v for k, v in seed.items() if _fits(space.params.get(k), v)},
                          **{f"setting.{k}": v for k, v in seed.items() if _fits(self.settings.get(k), v)}}
                study.enqueue_trial(params, skip_if_exists=True)

    def _dominated_values(self) -> list[float]:
        """What a trial that does not fit (or fails) tells the sampler: worse than every measured one on both
        objectives, so TPE learns to avoid its region (a FAIL state teaches TPE nothing, and it proposes
        the same unfit combination again)."""
        ok = [r for r in self.records if r.get("q") is not None]
        return [min((r["q"] for r in ok), default=0.0), max((r["cost"] for r in ok), default=1.0) + 1.0]

    def _postfix(self, left: float | None) -> str:
        ok = [r for r in self.records if r.get("q") is not None and r["q"] >= self.floor]
        best = min(ok, key=lambda r: r["cost"], default=None)
        text = f"best cost {best['cost']:.2f} at {self.metric} {best['q']:.3g}" if best else "none meets the floor yet"
        return text + (f", {max(0.0, left):.0f} s left" if left is not None else "")


__all__ += ["_Search", "_finalists", "_run", "_scorer"]
