"""One way to inject: a config + ``apply`` that attaches named, removable hooks and returns a handle.

Hooks are ``diffusers.hooks`` ``ModelHook`` objects registered in each module's
``HookRegistry`` under the name ``mmskip.<technique>``: instance forwards are patched, modules
are never replaced, so ``state_dict`` keys, ``output_hidden_states`` and accelerate offload
hooks keep working. ``SkipHandle.remove()`` unregisters every hook and deletes what the
registry added, leaving the model exactly as it was.
"""

from __future__ import annotations

import importlib
import json
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from diffusers.hooks import HookRegistry, ModelHook

__all__ = ["SkipConfig", "SkipHandle", "SkipStats", "apply", "applied"]

_HANDLE_ATTR = "_mmskip_handle"
_CONFIGS: dict[str, type[SkipConfig]] = {}


@dataclass(frozen=True)
class SkipConfig:
    """Base class of every technique's config: a frozen, JSON-serializable dataclass.

    Subclasses set ``technique`` and implement ``_attach(model, handle)``, registering their
    hooks with :meth:`SkipHandle.add_hook`.
    """

    technique: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.technique:
            _CONFIGS[cls.technique] = cls

    def _attach(self, model: torch.nn.Module, handle: SkipHandle) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement _attach()")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"technique": self.technique, "module": type(self).__module__}
        for key, value in asdict(self).items():
            sched = getattr(self, key)
            out[key] = sched.to_dict() if hasattr(sched, "to_dict") else value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @staticmethod
    def from_dict(d: dict[str, Any] | str) -> SkipConfig:
        """Rebuild any registered config from ``to_dict()`` output (or its JSON)."""
        from . import schedules

        if isinstance(d, str):
            d = json.loads(d)
        d = dict(d)
        name = d.pop("technique", None)
        module = d.pop("module", None)
        if name not in _CONFIGS and isinstance(module, str) and module.split(".")[0] == "mmskip":
            importlib.import_module(module)  # techniques register when their module is imported
        if name not in _CONFIGS:
            raise ValueError(f"unknown technique {name!r}; known: {sorted(_CONFIGS)}")
        kwargs = {}
        for key, value in d.items():
            if isinstance(value, dict) and "kind" in value:
                value = schedules.from_dict(value)
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        return _CONFIGS[name](**kwargs)


class SkipStats:
    """Counts of seen and skipped work, filled in by a technique's hooks.

    ``seen[name]`` counts the units (tokens for layers, calls for diffusion blocks) that
    reached a hooked item and ``skipped[name]`` those it did not compute; ``cost[name]`` is the
    item's FLOPs per unit, used to estimate the fraction of FLOPs actually spent.
    ``fixed_cost`` per ``fixed_units`` covers parts that never skip (the LM head, the VAE).
    """

    def __init__(self) -> None:
        self.seen: dict[str, float] = defaultdict(float)
        self.skipped: dict[str, float] = defaultdict(float)
        self.cost: dict[str, float] = {}
        self.fixed_cost: float = 0.0
        self.fixed_units: float = 0.0

    def record(self, name: str, units: float = 1.0, skipped: float = 0.0) -> None:
        """``units`` reached item ``name``; ``skipped`` of them were not computed."""
        self.seen[name] += units
        if skipped:
            self.skipped[name] += skipped

    def reset(self) -> None:
        self.seen.clear()
        self.skipped.clear()
        self.fixed_units = 0.0

    def flops(self) -> tuple[float, float]:
        """(FLOPs spent, FLOPs the unmodified model would spend on the same work), estimated."""
        full = self.fixed_cost * self.fixed_units
        saved = 0.0
        for name, c in self.cost.items():
            full += c * self.seen.get(name, 0.0)
            saved += c * self.skipped.get(name, 0.0)
        return full - saved, full

    def flops_fraction(self) -> float:
        """Estimated FLOPs spent / FLOPs the unmodified model would spend on the same work."""
        spent, full = self.flops()
        return spent / full if full else 1.0

    def as_dict(self) -> dict[str, Any]:
        names = sorted(set(self.seen) | set(self.skipped), key=_natural_key)
        items = {}
        for n in names:
            seen, skipped = self.seen.get(n, 0.0), self.skipped.get(n, 0.0)
            items[n] = {"executed": seen - skipped, "skipped": skipped}
        return {
            "items": items,
            "executed": sum(v["executed"] for v in items.values()),
            "skipped": sum(v["skipped"] for v in items.values()),
            "flops_fraction": self.flops_fraction(),
            "flops": dict(zip(("spent", "full"), self.flops())),
        }


def _natural_key(name: str) -> tuple:
    import re

    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


class SkipHandle:
    """What :func:`apply` returns: ``stats()``, ``remove()``, and the config it applied."""

    def __init__(self, model: torch.nn.Module, config: SkipConfig) -> None:
        self.model = model
        self.config = config
        self.hook_name = f"mmskip.{config.technique}"
        self.stats_ = SkipStats()
        self.state: dict[str, Any] = {}  # technique-private state shared by its hooks
        self._hooked: list[tuple[torch.nn.Module, bool, bool, str]] = []
        self._removed = False

    # -- used by techniques ---------------------------------------------------------------
    def add_hook(self, module: torch.nn.Module, hook: ModelHook, suffix: str = "") -> None:
        """Register ``hook`` on ``module`` under this handle's name (plus an optional suffix)."""
        had_registry = hasattr(module, "_diffusers_hook")
        had_forward = "forward" in module.__dict__
        registry = HookRegistry.check_if_exists_or_initialize(module)
        registry.register_hook(hook, self.hook_name + suffix)
        self._hooked.append((module, had_registry, had_forward, self.hook_name + suffix))

    # -- public ------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Executed vs skipped work per hooked item and the estimated FLOPs fraction spent."""
        out = self.stats_.as_dict()
        out["technique"] = self.config.technique
        extra = self.state.get("stats_extra")
        if callable(extra):
            out.update(extra())
        return out

    def reset_stats(self) -> None:
        self.stats_.reset()

    def remove(self) -> None:
        """Unregister every hook; the model computes exactly what it computed before ``apply``."""
        if self._removed:
            raise RuntimeError(f"{self.hook_name} was already removed from this model")
        for module, had_registry, had_forward, name in reversed(self._hooked):
            registry = module._diffusers_hook
            registry.remove_hook(name, recurse=False)
            if not registry.hooks and not had_registry:
                del module._diffusers_hook
                if not had_forward and "forward" in module.__dict__:
                    del module.__dict__["forward"]
        self._hooked.clear()
        if self.model.__dict__.get(_HANDLE_ATTR) is self:
            del self.model.__dict__[_HANDLE_ATTR]
        self._removed = True

    @property
    def removed(self) -> bool:
        return self._removed

    def __repr__(self) -> str:
        state = "removed" if self._removed else "active"
        return f"SkipHandle({self.config!r}, {state})"


def apply(model: torch.nn.Module, config: SkipConfig) -> SkipHandle:
    """Attach ``config``'s technique to ``model`` and return the handle that removes it.

    Raises ``RuntimeError`` if an mmskip config is already applied (remove it first) and
    :class:`mmskip.registry.UnsupportedModelError` for a model no adapter knows.
    """
    if not isinstance(config, SkipConfig):
        raise TypeError(f"apply() takes an mmskip config (e.g. LayerSkipConfig), got {type(config).__name__}")
    existing = model.__dict__.get(_HANDLE_ATTR)
    if existing is not None:
        raise RuntimeError(
            f"{type(model).__name__} already has {existing.config.technique!r} applied; "
            "call handle.remove() before applying another config"
        )
    handle = SkipHandle(model, config)
    try:
        config._attach(model, handle)
    except BaseException:
        handle.remove()
        raise
    model.__dict__[_HANDLE_ATTR] = handle
    return handle


@contextmanager
def applied(model: torch.nn.Module, config: SkipConfig) -> Iterator[SkipHandle]:
    """``with mmskip.applied(model, config) as h: ...`` applies for the block, then removes."""
    handle = apply(model, config)
    try:
        yield handle
    finally:
        handle.remove()
