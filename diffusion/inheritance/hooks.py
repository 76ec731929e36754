"""The hooks of feature inheritance (:mod:`mmskip.diffusion.inheritance`), what they share, and
:func:`attach`, which resolves the targets and registers the hooks on a handle.

``RootHook`` on the denoiser tracks steps and measures FLOPs on the first call; ``ProbeHook``
feeds the adaptive schedule; ``OutputHook`` inherits a module's whole output; ``RangeHook``
makes a run of residual modules (a :class:`Range`) add its cached residual: the sum of its
members' own contributions ``out - in``. Each
hook asks its owner, the technique's :class:`~mmskip.diffusion.inheritance.state.InheritanceState`,
whether this step computes. A call the owner does not serve (another thread's, when a pipeline
bound the owner to its own: :func:`mmskip.diffusion.tracker.serves`) runs the module's own forward and touches
no state; the root hook also ignores that thread's ``reset_stateful_hooks``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers.hooks import ModelHook
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mmskip.inject import SkipHandle
from mmskip.registry import get_adapter
from mmskip.schedules import AdaptiveSchedule

from ..adapters import DiffusionAdapter, ResidualIO
from ..tracker import serves
from .config import FeatureInheritanceConfig
from .state import InheritanceState

__all__ = ["attach", "Range", "RootHook", "ProbeHook", "OutputHook", "RangeHook"]

logger = logging.getLogger(__name__)


class Range:
    """A contiguous run of residual modules inherited as one residual ``out - in``."""

    def __init__(self, name: str, modules: list[nn.Module], io: ResidualIO) -> None:
        self.name = name
        self.modules = modules
        self.io = io
        self.computing = True
        self.acc: tuple[torch.Tensor | None, ...] | None = None  # members' contributions so far (computing)
        self.flops0 = 0.0


def first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor):
                return o
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(f"cannot use {type(out).__name__} as an adaptive probe")


def input_shape(args: tuple, kwargs: dict) -> tuple[int, ...] | None:
    for x in (*args, *kwargs.values()):
        if isinstance(x, torch.Tensor):
            return tuple(x.shape)
    return None


def clone_tree(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return tuple(clone_tree(v) for v in x)
    if isinstance(x, list):
        return [clone_tree(v) for v in x]
    return x


def detach_tree(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return tuple(detach_tree(v) for v in x)
    if isinstance(x, list):
        return [detach_tree(v) for v in x]
    return x


# -- hooks -------------------------------------------------------------------------------------


class RootHook(ModelHook):
    """On the denoiser: refuses concurrent use, tracks steps, decides, measures FLOPs once.

    Stateful in diffusers' sense: ``HookRegistry.reset_stateful_hooks()`` (which diffusers
    pipelines run at the end of each call for cache-capable denoisers) resets the state.
    """

    _is_stateful = True

    def __init__(self, owner: InheritanceState) -> None:
        super().__init__()
        self.owner = owner

    def reset_state(self, module: nn.Module) -> nn.Module:
        if serves(self.owner.thread):  # not another pipeline's end-of-call reset on a shared denoiser
            self.owner.reset()
        return module

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not serves(self.owner.thread):
            return self.fn_ref.original_forward(*args, **kwargs)
        eager = not torch.compiler.is_compiling()  # eager: the bookkeeping without the compiler's wrappers
        measure = self._begin(args, kwargs) if eager else self._enter(args, kwargs)
        try:
            if measure:
                return self._measured(args, kwargs)
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            if eager:
                self.owner.guard.exit()
            else:
                self._exit()

    def _begin(self, args: tuple, kwargs: dict) -> bool:
        owner = self.owner
        t = owner.adapter.timestep(args, kwargs)
        key = owner.key(args, kwargs)
        owner.guard.enter(starts=owner.tracker.starts_new(t, key))
        try:
            owner.on_call(t, key)
        except BaseException:
            owner.guard.exit()
            raise
        owner.counts.fixed_units += 1
        if owner.decision is not None:
            owner.record_targets(owner.decision)
        return not owner.costs_known and bool(owner.decision)

    # Under torch.compile the bookkeeping runs outside the graph: reading the timestep as a Python
    # float would otherwise specialise the compiled graph on it and recompile on every step.
    _enter = torch.compiler.disable(_begin)

    @torch.compiler.disable
    def _exit(self) -> None:
        self.owner.guard.exit()

    @torch.compiler.disable
    def _measured(self, args: tuple, kwargs: dict) -> Any:
        """The one call whose FLOPs are counted (eager, also under torch.compile)."""
        owner = self.owner
        with FlopCounterMode(display=False) as fc:
            owner.fc = fc
            try:
                out = self.fn_ref.original_forward(*args, **kwargs)
            finally:
                owner.fc = None
        owner.measure(fc)
        return out


class ProbeHook(ModelHook):
    def __init__(self, owner: InheritanceState) -> None:
        super().__init__()
        self.owner = owner

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        if serves(self.owner.thread):
            self._probe(output)
        return output

    @torch.compiler.disable  # reads the signal as a Python float and decides: outside compiled graphs
    def _probe(self, output: Any) -> None:
        self.owner.probe(first_tensor(output))


class OutputHook(ModelHook):
    """Inherit a module's whole output (UNet blocks; attention / feed-forward layers)."""

    def __init__(self, owner: InheritanceState, name: str) -> None:
        super().__init__()
        self.owner = owner
        self.name = name

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        owner = self.owner
        if not serves(owner.thread):
            return self.fn_ref.original_forward(*args, **kwargs)
        cache = owner.slot_cache()
        shape = input_shape(args, kwargs)
        compute = owner.computes(self.name)
        if not compute and (cache.get(self.name) is None or cache[self.name][0] != shape):
            logger.warning(
                "feature inheritance: %s has no cached output for input shape %s in this trajectory; recomputing "
                "it on step %d", self.name, shape, owner.tracker.step
            )
            owner.counts.record(self.name, 0.0, -1.0)  # counted as inherited when the step decided
            compute = True
        if compute:
            before = owner.flops_now()
            out = self.fn_ref.original_forward(*args, **kwargs)
            owner.add_cost(self.name, owner.flops_now() - before)
            cache[self.name] = (shape, detach_tree(out))
            return out
        return clone_tree(cache[self.name][1])


class RangeHook(ModelHook):
    """Member ``index`` of a residual range: the first adds the cached residual, the rest pass through."""

    def __init__(self, owner: InheritanceState, rng: Range, index: int) -> None:
        super().__init__()
        self.owner = owner
        self.rng = rng
        self.index = index
        self.last = index == len(rng.modules) - 1

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        owner, rng = self.owner, self.rng
        if not serves(owner.thread):
            return self.fn_ref.original_forward(*args, **kwargs)
        ins = rng.io.inputs(args, kwargs)
        if self.index == 0:
            rng.computing = owner.computes(rng.name)
            if not rng.computing:
                residual = owner.slot_cache().get(rng.name)
                if _fits(residual, ins):
                    return rng.io.build(tuple(None if r is None else i + r for i, r in zip(ins, residual)), args, kwargs)
                logger.warning(
                    "feature inheritance: %s has no cached residual matching input shapes %s in this trajectory; "
                    "recomputing it on step %d", rng.name, [None if i is None else tuple(i.shape) for i in ins],
                    owner.tracker.step,
                )
                owner.counts.record(rng.name, 0.0, -1.0)  # counted as inherited when the step decided
                rng.computing = True
            rng.acc = None
            rng.flops0 = owner.flops_now()
        elif not rng.computing:
            return rng.io.build(ins, args, kwargs)
        out = self.fn_ref.original_forward(*args, **kwargs)
        # the range's residual is the sum of its members' own contributions, so what the model adds
        # between members (ControlNet block samples) is recomputed, never frozen into the cache
        mine = _contributions(rng.name, rng.io.outputs(out), ins)
        rng.acc = mine if rng.acc is None else tuple(
            None if (a is None or m is None) else a + m for a, m in zip(rng.acc, mine)
        )
        if self.last:
            owner.add_cost(rng.name, owner.flops_now() - rng.flops0)
            owner.slot_cache()[rng.name] = rng.acc
            rng.acc = None
        return out


def _fits(residual: tuple[torch.Tensor | None, ...] | None, ins: tuple[torch.Tensor | None, ...]) -> bool:
    """Whether a cached residual can be added to this call's stream tensors (each present one's shape)."""
    if residual is None:
        return False
    for i, r in zip(ins, residual, strict=True):
        if r is not None and (i is None or i.shape != r.shape):
            return False
    return True


def _contributions(name: str, outs: tuple[torch.Tensor | None, ...], ins: tuple[torch.Tensor | None, ...]
                   ) -> tuple[torch.Tensor | None, ...]:
    """A member's own contribution to each stream, ``out - in`` (``None`` where a stream is absent);
    ``ValueError`` when it changes a stream's shape (then it is not a residual unit)."""
    mine: list[torch.Tensor | None] = []
    for o, i in zip(outs, ins, strict=True):
        if o is None or i is None:
            mine.append(None)
            continue
        if o.shape != i.shape:
            raise ValueError(
                f"feature inheritance: {name} changes a stream's shape ({tuple(i.shape)} -> "
                f"{tuple(o.shape)}), so it is not a residual unit; target the blocks after the change"
            )
        mine.append((o - i).detach())
    return tuple(mine)


# -- attach ------------------------------------------------------------------------------------


def attach(config: FeatureInheritanceConfig, model: nn.Module, handle: SkipHandle) -> InheritanceState:
    """Feature inheritance on ``model``: its state, and hooks on every target, the probe (adaptive
    schedules) and the model, registered with ``handle`` (``handle.state`` is the new state)."""
    ad: DiffusionAdapter = get_adapter(model, "diffusion")
    state = InheritanceState(config, ad, handle)
    cfg = config
    targets = list(cfg.targets) if cfg.targets is not None else ad.defaults(cfg.granularity)
    if not targets:
        raise ValueError(f"{type(ad.model).__name__} has no default {cfg.granularity} targets; pass targets=")
    claimed: list[str] = []
    for name in targets:
        _add_target(state, name, claimed)
    if isinstance(cfg.schedule, AdaptiveSchedule):
        probe = cfg.probe or ad.probe
        mod = ad.module(probe)
        clash = [c for c in claimed if c == probe or c.startswith(probe + ".") or probe.startswith(c + ".")]
        if clash:
            raise ValueError(
                f"the adaptive probe {probe!r} must run before every target, but it overlaps {clash}; "
                "choose another probe= or other targets"
            )
        handle.add_hook(mod, ProbeHook(state), ".probe")
    handle.add_hook(ad.model, RootHook(state), ".root")
    handle.state = state
    return state

def _add_target(state: InheritanceState, name: str, claimed: list[str]) -> None:
    ad = state.adapter
    if not isinstance(name, str) or not name:
        raise ValueError(f"target names must be non-empty strings, got {name!r}")
    if ":" in name:
        _add_range(state, name, claimed)
        return
    try:
        module = ad.model.get_submodule(name)
    except AttributeError:
        valid = ad.candidates(state.config.granularity)
        shown = ", ".join(valid[:12]) + (" ..." if len(valid) > 12 else "")
        raise ValueError(
            f"{type(ad.model).__name__} has no module {name!r}; valid {state.config.granularity} targets "
            f"include: {shown}"
        ) from None
    if module is ad.model:
        raise ValueError("the whole model cannot be a target")
    _claim(name, claimed)
    io = ad.io(module)
    residual = io is not None and (state.config.granularity != "block" or not ad.is_unet)
    if state.recompute_only:  # checked and counted (RootHook), never inherited: not hooked
        pass
    elif residual:
        rng = Range(name, [module], io)
        state.handle.add_hook(module, RangeHook(state, rng, 0), "")
    else:
        if state.config.granularity != "block" or not ad.is_unet:
            logger.debug("%s (%s) is not a residual unit; its whole output is inherited", name, type(module).__name__)
        state.handle.add_hook(module, OutputHook(state, name), "")
    state.names.append(name)

def _add_range(state: InheritanceState, name: str, claimed: list[str]) -> None:
    ad = state.adapter
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
        _claim(m, claimed)
    rng = Range(name, modules, io)
    for k, mod in enumerate(modules):
        if not state.recompute_only:
            state.handle.add_hook(mod, RangeHook(state, rng, k), "")
    state.names.append(name)

def _claim(name: str, claimed: list[str]) -> None:
    for c in claimed:
        if c == name or name.startswith(c + ".") or c.startswith(name + "."):
            raise ValueError(f"targets {c!r} and {name!r} overlap; give each module once")
    claimed.append(name)
