"""Feature inheritance's typed state (``handle.state``): the step tracker, the cached features per
conditioning slot, the adaptive probe's references, the decisions, and measured costs.

The hooks (:mod:`.hooks`) ask it whether a step computes and hand it what they computed.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from mmskip.inject import CallGuard, SkipHandle, TechniqueState
from mmskip.schedules import AdaptiveSchedule

from ..adapters import DiffusionAdapter
from ..tracker import CallKeyMemo, DeferredKey, StepTracker, bound_thread
from .config import FeatureInheritanceConfig, never_inherits, step_computes

__all__ = ["InheritanceState", "MAX_SLOTS"]

logger = logging.getLogger(__name__)

MAX_SLOTS = 8  # calls per step with distinct conditioning whose features are cached


class InheritanceState(TechniqueState):
    """Feature inheritance's state on one denoiser (``handle.state``).

    ``tracker`` (the trajectory's grid step and call slot), ``cache`` (per slot: the features of
    each target at the last recompute step; at most :data:`MAX_SLOTS` slots), the adaptive
    probe's references, and the recomputed / inherited steps of the current trajectory.
    Built and attached by :func:`mmskip.diffusion.inheritance.hooks.attach`.
    ``begin(num_steps, visited)`` starts a trajectory on a known grid (drop-in pipelines call
    it); ``reset()`` forgets the trajectory in progress. One thread at a time: a forward from a
    second thread while one is in flight raises :class:`mmskip.inject.ConcurrentUseError`;
    attached by a drop-in pipeline's call, the state is bound to that call's ``thread`` and
    other threads' calls pass through the hooks unchanged (:func:`mmskip.diffusion.tracker.serves`).
    """

    def __init__(self, config: FeatureInheritanceConfig, adapter: DiffusionAdapter, handle: SkipHandle) -> None:
        self.config = config
        self.adapter = adapter
        self.handle = handle
        self.counts = handle.counts
        self.tracker = StepTracker()
        self.key_memo = CallKeyMemo()  # the conditioning's fingerprint, once per trajectory, not per call
        self.thread = bound_thread()  # set before any hook is attached: a call already in flight passes
        self.guard = CallGuard(config.technique)
        self.decision: bool | None = None
        self._plan: dict[tuple[int, int | None], bool] = {}  # step_computes per (step, grid): the schedule is fixed
        self.cache: OrderedDict[Hashable, dict[str, Any]] = OrderedDict()
        # the current call's entry of ``cache``, chosen in eager code: the hooks (traced into a compiled
        # denoiser) read this dict, never the slot key, so graphs do not guard on the conditioning's
        # fingerprint and a new prompt or label reuses them instead of compiling its own
        self.features: dict[str, Any] = {}
        self.probe_ref: dict[Hashable, torch.Tensor] = {}
        self.computed_steps: list[int] = []
        self.skipped_steps = 0
        self.changes: list[float] = []  # the adaptive signal per step (slot 0), for from_changes()
        self.costs_known = not config.measure_flops
        self.names: list[str] = []  # stats names of targets, for FLOPs accounting
        self.fc: FlopCounterMode | None = None  # set during the one measured call
        # every step recomputes (interval(1), ...): no target is hooked, nothing cached, keys deferred
        self.recompute_only = never_inherits(config.schedule)

    # -- measured costs ------------------------------------------------------------------------
    def measured_costs(self) -> tuple[dict[str, float], float] | None:
        """(FLOPs per target call, FLOPs of the rest of a denoiser call) once measured, else None."""
        if not (self.costs_known and self.config.measure_flops):
            return None
        return {n: self.counts.cost[n] for n in self.names if n in self.counts.cost}, self.counts.fixed_cost

    def adopt_costs(self, costs: dict[str, float], fixed: float) -> None:
        """Use costs measured by an earlier application to the same denoiser (no measuring call)."""
        self.counts.cost.update(costs)
        self.counts.fixed_cost = fixed
        self.costs_known = True

    # -- trajectories --------------------------------------------------------------------------
    def begin(self, num_steps: int | None = None, visited: Any = None) -> None:
        """Start a trajectory on a ``num_steps`` grid of which the sampler visits ``visited``."""
        self.tracker.begin(num_steps, visited)

    def begin_call(self, num_steps: int, visited: tuple[int, ...]) -> None:
        """A pipeline call starts: :meth:`begin` on its grid."""
        self.begin(num_steps, visited)

    def reset(self) -> None:
        """Forget the trajectory in progress: cached features and probe references. Its step record
        stays readable in ``stats()`` until the next trajectory starts (diffusers pipelines reset
        stateful hooks at the end of every call, before the caller reads the stats)."""
        self.tracker.reset()
        self.key_memo.clear()
        self.cache.clear()
        self.features = {}
        self.probe_ref.clear()

    def _clear(self) -> None:
        self.cache.clear()
        self.features = {}
        self.probe_ref.clear()
        self.computed_steps = []
        self.skipped_steps = 0
        self.changes = []

    def key(self, args: tuple, kwargs: dict) -> Hashable:
        if self.recompute_only:  # no per-conditioning cache: the step tracker alone compares keys
            return DeferredKey(lambda: self.adapter.call_key(args, kwargs))
        return self.adapter.call_key(args, kwargs, self.key_memo)

    # -- decisions ---------------------------------------------------------------------------
    def on_call(self, t: float | None, key: Hashable) -> None:
        tr = self.tracker
        if tr.observe(t, key):
            self._clear()
        if self.recompute_only:
            self.decision = True
            self._note(True)
            return
        if tr.slot in self.cache:
            self.cache.move_to_end(tr.slot)
        else:
            if len(self.cache) >= MAX_SLOTS:
                old, _ = self.cache.popitem(last=False)
                self.probe_ref.pop(old, None)
                logger.warning(
                    "feature inheritance: more than %d calls with different conditioning in one step; dropping the "
                    "oldest one's cached features (it will recompute)", MAX_SLOTS
                )
            # every target's entry exists from the start (None until computed): the compiled denoiser then
            # sees the same dict keys on the first call of a trajectory as on later ones (no extra graph)
            self.cache[tr.slot] = dict.fromkeys(self.names)
        self.features = self.cache[tr.slot]
        if all(v is None for v in self.features.values()):
            self.decision = True  # nothing to inherit yet
        elif isinstance(self.config.schedule, AdaptiveSchedule):
            self.decision = None  # the probe decides
        else:
            self.decision = self._computes(tr.step, tr.num_steps)
        if self.decision is not None:
            self._note(self.decision)

    def _computes(self, step: int, num_steps: int | None) -> bool:
        """:func:`step_computes` of the config's static schedule, worked out once per step and grid
        (a schedule's ratios list every step of the grid: rebuilding it per call is O(steps))."""
        key = (step, num_steps)
        if key not in self._plan:
            self._plan[key] = step_computes(self.config.schedule, step, num_steps)
        return self._plan[key]

    def _note(self, compute: bool) -> None:
        if self.tracker.first_call_of_step:
            if compute:
                self.computed_steps.append(self.tracker.step)
            else:
                self.skipped_steps += 1

    def probe(self, value: torch.Tensor) -> None:
        slot, sched = self.tracker.slot, self.config.schedule
        assert isinstance(sched, AdaptiveSchedule)
        ref = self.probe_ref.get(slot)
        signal = None if ref is None or ref.shape != value.shape else _signal(sched.signal, value, ref)
        if self.tracker.first_call_of_step:
            self.changes.append(0.0 if signal is None else signal)
        if self.decision is None:
            step = self.tracker.step
            if signal is None or step < sched.warmup:
                compute = True
            else:
                compute = sched.compute(signal)
                if not compute and (self.skipped_steps + 1) > sched.max_skip * (step + 1):
                    compute = True
            self.decision = compute
            self._note(compute)
            self.record_targets(compute)
        if self.decision:
            self.probe_ref[slot] = value.detach()

    def record_targets(self, compute: bool) -> None:
        """Count this call's decision for every target (in eager code: counters are not recorded
        inside torch.compile graphs). A target that must recompute anyway corrects its count."""
        if compute:
            self.counts.record_each(self.names, 1.0)
            return
        for name in self.names:
            self.counts.record(name, 1.0, 1.0)

    def computes(self, who: str) -> bool:
        if self.decision is None:
            raise RuntimeError(
                f"target {who!r} ran before the adaptive probe decided this step; the probe must run first"
            )
        return self.decision

    def slot_cache(self) -> dict[str, Any]:
        """This call's cached features by target name (``None``: not computed in this trajectory yet)."""
        return self.features

    def flops_now(self) -> float:
        return float(self.fc.get_total_flops()) if self.fc is not None else 0.0

    def add_cost(self, name: str, flops: float) -> None:
        if self.fc is not None:
            self.counts.cost[name] = self.counts.cost.get(name, 0.0) + flops

    def measure(self, fc: FlopCounterMode) -> None:
        total = float(fc.get_total_flops())
        spent = sum(self.counts.cost.get(n, 0.0) for n in self.names)
        self.counts.fixed_cost = max(total - spent, 0.0)
        self.costs_known = True
        self.fc = None

    def stats(self) -> dict[str, Any]:
        extra: dict[str, Any] = {} if self.costs_known and self.config.measure_flops else {"flops_fraction": None}
        return {
            **extra,
            "recomputed_steps": list(self.computed_steps),
            "inherited_steps": self.skipped_steps,
            "probe_changes": list(self.changes),
            "granularity": self.config.granularity,
            "targets": list(self.names),
        }


def _signal(kind: str, value: torch.Tensor, ref: torch.Tensor) -> float:
    v, r = value.float(), ref.float()
    if kind == "cosine":
        return float(torch.nn.functional.cosine_similarity(v.flatten(), r.flatten(), dim=0))
    return float((v - r).abs().mean() / r.abs().mean().clamp_min(1e-12))
