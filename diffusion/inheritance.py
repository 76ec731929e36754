"""Feature inheritance (A-SDM, Zhu et al., 2024): reuse features computed at an earlier denoising step.

On a *recompute* step every target runs and its features are cached; on an *inherit* step a
target does not run and its cached features stand in. Granularities (A-SDM's block / layer /
unit, see :mod:`mmskip.diffusion.adapters`):

* ``block``: UNet ``down_blocks.i`` / ``mid_block`` / ``up_blocks.i`` return their cached
  outputs (with the default targets this is DeepCache's shallow/deep split); for diffusion
  transformers (DiT, PixArt, SD3, Flux, Qwen-Image, Wan, ...) a range ``<stack>.a:b`` of one
  block list (``transformer_blocks.1:18``, ``single_transformer_blocks.0:37``) adds its cached
  residual ``out - in`` on each stream to the fresh input, and the blocks inside it do not run.
* ``layer``: attention and feed-forward modules inside blocks return their cached outputs,
  which their block adds to its fresh residual stream.
* ``unit``: residual units (UNet ResNet / Transformer2D layers, single transformer blocks) add
  their cached residual contribution to their fresh input.

Steps are indices of the pipeline's ``num_inference_steps`` grid (see :mod:`.tracker`). The
shared scheduler picks the recompute steps: ``interval(k)`` (uniform), ``explicit(keep=...)``
or :func:`mmskip.diffusion.step_schedules.nonuniform` (denser where the trajectory moves fast),
or ``adaptive(threshold, signal="relative_change")``: a cheap probe (the first block, always
computed) is compared with its value at the last recompute step and the step recomputes when
its relative change exceeds the threshold.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mmskip.inject import CallGuard, SkipHandle, TechniqueState
from mmskip.registry import get_adapter
from mmskip.schedules import AdaptiveSchedule, ExplicitSchedule, Schedule, interval

from .adapters import GRANULARITIES, DiffusionAdapter
from .inheritance_hooks import OutputHook, ProbeHook, Range, RangeHook, RootHook
from .plan import DenoiserConfig, check_step_schedule
from .tracker import StepTracker, bound_thread

__all__ = ["FeatureInheritanceConfig", "InheritanceState", "step_computes"]

logger = logging.getLogger(__name__)

MAX_SLOTS = 8  # calls per step with distinct conditioning whose features are cached


@dataclass(frozen=True)
class FeatureInheritanceConfig(DenoiserConfig):
    """Inherit features of ``targets`` at ``granularity`` on the steps ``schedule`` does not compute.

    Feature inheritance from A-SDM (Zhu et al., 2024, "A-SDM: Accelerating Stable Diffusion
    through Model Assembly and Feature Inheritance Strategies"), https://arxiv.org/abs/2406.00210.
    A model-level technique: ``mmskip.apply(denoiser, config)``, or ``pipe.enable_skip(config)``
    on an ``mmskip.pipelines`` pipeline.

    Args:
        schedule: which denoising steps recompute (default ``interval(3)``: every third step).
            Static schedules index the pipeline's ``num_inference_steps`` grid (the user's step
            numbers, also when step skipping or the teleport visit only some of them); one built
            with ``num=`` must match ``num_inference_steps``. ``adaptive(threshold,
            "relative_change" | "cosine")`` recomputes when the probe moved more than
            ``threshold`` since the last recompute.
        granularity: ``"block"`` (default), ``"layer"`` or ``"unit"``: what a target is (UNet
            blocks / transformer block ranges; attention and feed-forward modules; residual units).
        targets: module names (or transformer ranges ``"transformer_blocks.a:b"``, any of the
            model's block lists: ``"single_transformer_blocks.0:37"``, Wan's ``"blocks.1:39"``) whose features
            are inherited; default ``None``: the adapter's deep region (all blocks but the first
            and the last).
        probe: adaptive schedules only: the module whose output is the cheap probe; default
            ``None``: the first block.
        measure_flops: count FLOPs once on the first call so that
            ``handle.stats()["flops_fraction"]`` is the fraction actually spent (default True).
    """

    technique: ClassVar[str] = "feature_inheritance"
    schedule: Schedule = field(default_factory=lambda: interval(3))
    granularity: str = "block"
    targets: tuple[str, ...] | None = None
    probe: str | None = None
    measure_flops: bool = True

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if not isinstance(self.schedule, Schedule):
            raise TypeError(f"schedule must be an mmskip.schedules schedule, got {type(self.schedule).__name__}")
        if isinstance(self.schedule, AdaptiveSchedule) and self.schedule.signal not in ("relative_change", "cosine"):
            raise ValueError(
                f"feature inheritance measures the probe's 'relative_change' or 'cosine' similarity between "
                f"steps; adaptive signal {self.schedule.signal!r} is not supported"
            )
        if isinstance(self.targets, str):
            raise TypeError("targets must be a tuple of module names, not a single string")
        if self.targets is not None and len(self.targets) == 0:
            raise ValueError("targets=() inherits nothing; pass None for the default targets")
        if self.probe is not None and not isinstance(self.schedule, AdaptiveSchedule):
            raise ValueError("probe= is only used by adaptive schedules")

    def validate(self, num_steps: int | None = None) -> None:
        """Raise ``ValueError`` if a static schedule does not fit a ``num_steps`` grid (pipelines
        call this at the start of each call, before anything changes)."""
        if num_steps is not None:
            check_step_schedule(self.schedule, num_steps, "FeatureInheritanceConfig")

    def _attach(self, model: nn.Module, handle: SkipHandle) -> None:
        adapter: DiffusionAdapter = get_adapter(model, "diffusion")
        InheritanceState(self, adapter, handle).attach()


def step_computes(schedule: Schedule, step: int, num_steps: int | None) -> bool:
    """Whether a static ``schedule`` recomputes denoising ``step`` (of ``num_steps`` if known)."""
    n = num_steps if num_steps is not None else getattr(schedule, "num", None)
    if n is None:
        n = step + 1
        if isinstance(schedule, ExplicitSchedule) and schedule.ratio_list is None:
            idx = schedule.keep_idx if schedule.keep_idx is not None else schedule.skip_idx
            n = max(n, max(idx, default=0) + 1)
        elif isinstance(schedule, ExplicitSchedule):
            n = len(schedule.ratio_list)
    if step >= n:
        return True
    r = schedule.ratios(n)[step]
    if 0.0 < r < 1.0:
        raise ValueError(f"a step schedule must give 0 (inherit) or 1 (recompute) per step, got {r}")
    return r > 0


# -- the technique ---------------------------------------------------------------------------------


class InheritanceState(TechniqueState):
    """Feature inheritance's state on one denoiser (``handle.state``).

    ``tracker`` (the trajectory's grid step and call slot), ``cache`` (per slot: the features of
    each target at the last recompute step; at most :data:`MAX_SLOTS` slots), the adaptive
    probe's references, and the recomputed / inherited steps of the current trajectory.
    ``begin(num_steps, visited)`` starts a trajectory on a known grid (drop-in pipelines call
    it); ``reset()`` forgets the trajectory in progress. One thread at a time: a forward from a
    second thread while one is in flight raises :class:`mmskip.inject.ConcurrentUseError`;
    attached by a drop-in pipeline's call, the state is bound to that call's ``thread`` and
    other threads' calls pass through the hooks unchanged (:func:`.tracker.serves`).
    """

    def __init__(self, config: FeatureInheritanceConfig, adapter: DiffusionAdapter, handle: SkipHandle) -> None:
        self.config = config
        self.adapter = adapter
        self.handle = handle
        self.counts = handle.counts
        self.tracker = StepTracker()
        self.thread = bound_thread()  # set before any hook is attached: a call already in flight passes
        self.guard = CallGuard(config.technique)
        self.decision: bool | None = None
        self.cache: OrderedDict[Hashable, dict[str, Any]] = OrderedDict()
        self.probe_ref: dict[Hashable, torch.Tensor] = {}
        self.computed_steps: list[int] = []
        self.skipped_steps = 0
        self.changes: list[float] = []  # the adaptive signal per step (slot 0), for from_changes()
        self.costs_known = not config.measure_flops
        self.names: list[str] = []  # stats names of targets, for FLOPs accounting
        self.fc: FlopCounterMode | None = None  # set during the one measured call

    # -- target resolution -------------------------------------------------------------------
    def attach(self) -> None:
        cfg, ad = self.config, self.adapter
        targets = list(cfg.targets) if cfg.targets is not None else ad.defaults(cfg.granularity)
        if not targets:
            raise ValueError(f"{type(ad.model).__name__} has no default {cfg.granularity} targets; pass targets=")
        claimed: list[str] = []
        for name in targets:
            self._add_target(name, claimed)
        if isinstance(cfg.schedule, AdaptiveSchedule):
            probe = cfg.probe or ad.probe
            mod = ad.module(probe)
            clash = [c for c in claimed if c == probe or c.startswith(probe + ".") or probe.startswith(c + ".")]
            if clash:
                raise ValueError(
                    f"the adaptive probe {probe!r} must run before every target, but it overlaps {clash}; "
                    "choose another probe= or other targets"
                )
            self.handle.add_hook(mod, ProbeHook(self), ".probe")
        self.handle.add_hook(ad.model, RootHook(self), ".root")
        self.handle.state = self

    def _add_target(self, name: str, claimed: list[str]) -> None:
        ad = self.adapter
        if not isinstance(name, str) or not name:
            raise ValueError(f"target names must be non-empty strings, got {name!r}")
        if ":" in name:
            self._add_range(name, claimed)
            return
        try:
            module = ad.model.get_submodule(name)
        except AttributeError:
            valid = ad.candidates(self.config.granularity)
            shown = ", ".join(valid[:12]) + (" ..." if len(valid) > 12 else "")
            raise ValueError(
                f"{type(ad.model).__name__} has no module {name!r}; valid {self.config.granularity} targets "
                f"include: {shown}"
            ) from None
        if module is ad.model:
            raise ValueError("the whole model cannot be a target")
        self._claim(name, claimed)
        io = ad.io(module)
        residual = io is not None and (self.config.granularity != "block" or not ad.is_unet)
        if residual:
            rng = Range(name, [module], io)
            self.handle.add_hook(module, RangeHook(self, rng, 0), "")
        else:
            if self.config.granularity != "block" or not ad.is_unet:
                logger.debug("%s (%s) is not a residual unit; its whole output is inherited", name, type(module).__name__)
            self.handle.add_hook(module, OutputHook(self, name), "")
        self.names.append(name)

    def _add_range(self, name: str, claimed: list[str]) -> None:
        ad = self.adapter
        if ad.is_unet:
            raise ValueError(f"block ranges like {name!r} apply to transformer models; a UNet's blocks are named")
        prefix, _, span = name.rpartition(".")
        form = " or ".join(f"'{st}.a:b'" for st in ad.stacks)
        if prefix not in ad.stacks:
            raise ValueError(f"a block range must look like {form}, got {name!r}")
        blocks = ad.module(prefix)
        try:
            a, b = (int(x) for x in span.split(":"))
        except ValueError:
            raise ValueError(f"a block range must look like {form}, got {name!r}") from None
        if not 0 <= a < b <= len(blocks):
            raise ValueError(f"block range {name!r} is empty or outside 0..{len(blocks)}")
        modules = [blocks[i] for i in range(a, b)]
        io = ad.io(modules[0])
        if io is None:
            raise ValueError(f"{type(modules[0]).__name__} blocks are not residual; cannot inherit range {name!r}")
        members = [f"{prefix}.{i}" for i in range(a, b)]
        for m in members:
            self._claim(m, claimed)
        rng = Range(name, modules, io)
        for k, mod in enumerate(modules):
            self.handle.add_hook(mod, RangeHook(self, rng, k), "")
        self.names.append(name)

    @staticmethod
    def _claim(name: str, claimed: list[str]) -> None:
        for c in claimed:
            if c == name or name.startswith(c + ".") or c.startswith(name + "."):
                raise ValueError(f"targets {c!r} and {name!r} overlap; give each module once")
        claimed.append(name)

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
        self.cache.clear()
        self.probe_ref.clear()

    def _clear(self) -> None:
        self.cache.clear()
        self.probe_ref.clear()
        self.computed_steps = []
        self.skipped_steps = 0
        self.changes = []

    def key(self, args: tuple, kwargs: dict) -> Hashable:
        return self.adapter.call_key(args, kwargs)

    # -- decisions ---------------------------------------------------------------------------
    def on_call(self, t: float | None, key: Hashable) -> None:
        tr = self.tracker
        if tr.observe(t, key):
            self._clear()
        if tr.slot in self.cache:
            self.cache.move_to_end(tr.slot)
        elif len(self.cache) >= MAX_SLOTS:
            old, _ = self.cache.popitem(last=False)
            self.probe_ref.pop(old, None)
            logger.warning(
                "feature inheritance: more than %d calls with different conditioning in one step; dropping the "
                "oldest one's cached features (it will recompute)", MAX_SLOTS
            )
        if tr.slot not in self.cache:
            self.decision = True  # nothing to inherit yet
        elif isinstance(self.config.schedule, AdaptiveSchedule):
            self.decision = None  # the probe decides
        else:
            self.decision = step_computes(self.config.schedule, tr.step, tr.num_steps)
        if self.decision is not None:
            self._note(self.decision)

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
        for name in self.names:
            self.counts.record(name, 1.0, 0.0 if compute else 1.0)

    def computes(self, who: str) -> bool:
        if self.decision is None:
            raise RuntimeError(
                f"target {who!r} ran before the adaptive probe decided this step; the probe must run first"
            )
        return self.decision

    def slot_cache(self) -> dict[str, Any]:
        return self.cache.setdefault(self.tracker.slot, {})

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
