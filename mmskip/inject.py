"""One way to inject: a config + ``apply`` that attaches named, removable hooks and returns a handle.

Hooks are ``diffusers.hooks`` ``ModelHook`` objects registered in each module's
``HookRegistry`` under the name ``mmskip.<technique>``: instance forwards are patched, modules
are never replaced, so ``state_dict`` keys, ``output_hidden_states`` and accelerate offload
hooks keep working. ``SkipHandle.remove()`` unregisters every hook and deletes what the
registry added, leaving the model exactly as it was.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ._fields import check_field_types
from ._guard import CallGuard, ConcurrentUseError
from ._skip_stats import SkipStats

if TYPE_CHECKING:
    from diffusers.hooks import ModelHook

__all__ = [
    "SkipConfig",
    "SkipHandle",
    "SkipStats",
    "TechniqueState",
    "CallGuard",
    "ConcurrentUseError",
    "apply",
    "applied",
    "attach_hook",
]

logger = logging.getLogger(__name__)

_HANDLE_ATTR = "_mmskip_handle"
_INSTANCE_ATTRS = (_HANDLE_ATTR, "__deepcopy__", "__reduce_ex__")  # what apply() puts in the model's __dict__
_HOOK_PREFIX = "mmskip."
CONFIG_NAME = "mmskip_config.json"
_CONFIGS: dict[str, type[SkipConfig]] = {}
# modules that saved configs name but that moved (one folder per technique): old name -> new
_MOVED_MODULES = {
    "mmskip.speculative": "mmskip.swift",
    "mmskip.speculative.config": "mmskip.swift",
    "mmskip.routers": "mmskip.first_routers",
    "mmskip.diffusion.gaussian": "mmskip.diffusion.gaussian_teleport",
}


@dataclass(frozen=True)
class SkipConfig:
    """Base class of every technique's config: a frozen, JSON-serializable dataclass.

    The technique contract (DESIGN.md) every technique implements, model-level or sampler-level:

    1. **Config**: a frozen dataclass subclass with a ``technique`` id, a docstring with ``Args:``
       (each field, its default, what it means) and the paper's arXiv link, and validation in
       ``__post_init__`` whose messages say what to change. Field types are checked against the
       annotations before ``__post_init__`` runs (``bool`` fields take only booleans, ``int``
       fields only integers, ...).
    2. **State**: one :class:`TechniqueState` subclass per application, holding what the
       technique remembers between calls, with ``reset()`` and its ``stats()`` contribution.
       Set it as ``handle.state`` in ``_attach``; no technique reads another's state.
    3. **Hooks**: ``diffusers.hooks.ModelHook`` objects on the modules the registry's adapter
       names, registered with :meth:`SkipHandle.add_hook`. State shared by calls is guarded
       with a :class:`CallGuard` (concurrent use from two threads raises
       :class:`ConcurrentUseError`; it never corrupts the model).
    4. **Attach**: ``_attach(model, handle)``; :func:`apply` returns the handle and
       ``handle.remove()`` restores the model exactly. Sampler-level techniques (which
       diffusion steps run) do not hook modules; they implement ``plan()`` for the drop-in
       pipelines instead (see ``mmskip.diffusion``).

    Configs round-trip through ``to_dict()`` / ``to_json()`` / :meth:`from_dict` and
    ``save_pretrained(dir)`` / :meth:`from_pretrained` (``mmskip_config.json``).
    """

    technique: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.technique:
            _CONFIGS[cls.technique] = cls
        own = cls.__dict__.get("__post_init__")

        def __post_init__(self: SkipConfig) -> None:
            check_field_types(self)
            if own is not None:
                own(self)
            elif type(self).__mro__[1] is not SkipConfig:  # inherit a parent's validation
                parent = super(cls, self)
                if hasattr(parent, "__post_init__"):
                    parent.__post_init__()

        cls.__post_init__ = __post_init__

    def _attach(self, model: torch.nn.Module, handle: SkipHandle) -> None:
        raise TypeError(
            f"{type(self).__name__} is not a model-level technique and cannot be applied with mmskip.apply()"
        )

    # -- tuning ---------------------------------------------------------------------------
    @classmethod
    def search_space(cls, context: Any) -> Any:
        """The fields ``mmskip.tune`` may tune on ``context`` (a ``mmskip.tuning.TuneContext``) and how a
        sample becomes a config, as a ``mmskip.tuning.Space``; ``None`` (the default): not tuned there."""
        return None

    @staticmethod
    def registered() -> list[type[SkipConfig]]:
        """Every config class known so far (a wing's classes once the wing is imported)."""
        return list(_CONFIGS.values())

    # -- serialization ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"technique": self.technique, "module": _public_module(type(self))}
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
            try:
                d = json.loads(d)
            except json.JSONDecodeError as err:
                raise ValueError(f"SkipConfig.from_dict(): not valid JSON ({err.msg}): {d[:60]!r}") from None
        if not isinstance(d, dict):
            raise TypeError(
                f"SkipConfig.from_dict() takes a dict or JSON object as written by config.to_dict() / to_json(), "
                f"got {type(d).__name__}"
            )
        d = dict(d)
        name = d.pop("technique", None)
        module = d.pop("module", None)
        module = _MOVED_MODULES.get(module, module) if isinstance(module, str) else module
        if name not in _CONFIGS and isinstance(module, str) and module.split(".")[0] == "mmskip":
            try:
                importlib.import_module(module)  # techniques register when their module is imported
            except ImportError:
                pass
        if name not in _CONFIGS:
            raise ValueError(f"unknown technique {name!r}; known: {sorted(_CONFIGS)}")
        cls = _CONFIGS[name]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {unknown}; its fields are {sorted(names)}")
        kwargs = {}
        for key, value in d.items():
            if isinstance(value, dict) and "kind" in value:
                value = schedules.from_dict(value)
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        return cls(**kwargs)

    def saved_in(self, folder: Path) -> SkipConfig:
        """The config as stored in ``folder``: one that reads a file copies it there and names it
        relative to the folder, so the folder loads from anywhere. Default: itself."""
        return self

    def loaded_from(self, folder: Path) -> SkipConfig:
        """The config as read from ``folder``, file names relative to it resolved. Default: itself."""
        return self

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Write the config as ``mmskip_config.json`` in ``save_directory`` (created if needed)."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / CONFIG_NAME
        path.write_text(json.dumps(self.saved_in(folder).to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path) -> SkipConfig:
        """Load a config written by :meth:`save_pretrained` (a folder or the JSON file itself)."""
        p = Path(path)
        if p.is_dir():
            p = p / CONFIG_NAME
        if not p.is_file():
            raise FileNotFoundError(f"no mmskip config at {p}; write one with config.save_pretrained(folder)")
        config = SkipConfig.from_dict(p.read_text()).loaded_from(p.parent)
        if cls is not SkipConfig and not isinstance(config, cls):
            raise TypeError(f"{p} holds a {type(config).__name__}, not a {cls.__name__}")
        return config


def _public_module(cls: type) -> str:
    """The module a saved config names: a technique folder's package (``mmskip.layer_skip``) when
    the config lives in its ``config.py`` and the package exports it, else the defining module."""
    module = cls.__module__
    package, _, leaf = module.rpartition(".")
    if leaf == "config" and getattr(sys.modules.get(package), cls.__name__, None) is cls:
        return package
    return module


class TechniqueState:
    """What one applied technique remembers between calls (the diffusers ``BaseState`` idea).

    Subclasses hold typed fields, forget per-call memory in :meth:`reset` and add their
    entries to ``handle.stats()`` through :meth:`stats`.

    The per-call protocol: what a caller that applies the technique for one call (the drop-in
    pipelines of ``mmskip.pipelines``) calls on ``handle.state``, and nothing else. Every method
    has a no-op default, so a technique overrides only what it uses:
    :meth:`adopt_costs` right after ``apply`` (costs an earlier call measured),
    :meth:`begin_call` before sampling (again when the visited steps change, e.g. img2img
    ``strength``), :meth:`end_call` when the call ends, and :meth:`measured_costs` after
    ``handle.remove()`` (kept for the next call's :meth:`adopt_costs`).
    """

    def reset(self) -> None:
        """Forget what the last generation / trajectory left behind (counters stay)."""

    def stats(self) -> dict[str, Any]:
        """This technique's entries in ``handle.stats()``."""
        return {}

    def begin_call(self, num_steps: int, visited: tuple[int, ...]) -> None:
        """A call starts a trajectory on a ``num_steps`` grid of which the sampler visits the
        sorted grid steps ``visited``. Default: nothing (a technique that counts no steps)."""

    def end_call(self) -> None:
        """The call ended (normally or not), before its hooks are removed. Default: nothing."""

    def measured_costs(self) -> tuple[dict[str, float], float] | None:
        """(FLOPs per hooked item, FLOPs of the rest of a call) once measured, else ``None``
        (default: the technique measures nothing)."""
        return None

    def adopt_costs(self, costs: dict[str, float], fixed: float) -> None:
        """Use costs an earlier application to the same model measured (:meth:`measured_costs`),
        so this one need not measure them again. Default: ignored."""

    def forward_cost(self) -> float | None:
        """Decoding's sequential cost so far relative to plain decoding (one full forward per token),
        for a technique that saves forwards rather than FLOPs (speculative decoding); None: use FLOPs."""
        return None


class SkipHandle:
    """What :func:`apply` returns: ``stats()``, ``remove()``, the config it applied and its state.

    ``counts`` (:class:`SkipStats`) holds the executed / skipped work the hooks record; ``state``
    (a :class:`TechniqueState`) is what the technique remembers between calls.
    """

    def __init__(self, model: torch.nn.Module, config: SkipConfig) -> None:
        self.model = model
        self.config = config
        self.hook_name = f"{_HOOK_PREFIX}{config.technique}"
        self.counts = SkipStats()
        self.state: TechniqueState = TechniqueState()
        self._hooked: list[Callable[[], None]] = []
        self._attached: list[tuple[torch.nn.Module, ModelHook, str]] = []
        self._removed = False

    # -- used by techniques ---------------------------------------------------------------
    def add_hook(self, module: torch.nn.Module, hook: ModelHook, suffix: str = "") -> None:
        """Register ``hook`` on ``module`` under this handle's name (plus an optional suffix)."""
        self._hooked.append(attach_hook(module, hook, self.hook_name + suffix))
        self._attached.append((module, hook, self.hook_name + suffix))
        logger.debug("attached %s%s (%s) to %s", self.hook_name, suffix, type(hook).__name__, type(module).__name__)

    # -- public ------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Executed vs skipped work per hooked item, the estimated FLOPs fraction spent, and the
        technique's own entries (its state's ``stats()``)."""
        out = self.counts.as_dict()
        out["technique"] = self.config.technique
        out.update(self.state.stats())
        return out

    def reset_stats(self) -> None:
        """Zero the executed / skipped counts (the technique's learned state is kept)."""
        self.counts.reset()

    def remove(self) -> None:
        """Unregister every hook; the model computes exactly what it computed before ``apply``."""
        if self._removed:
            raise RuntimeError(f"{self.hook_name} was already removed from this model")
        for detach in reversed(self._hooked):
            detach()
        self._hooked.clear()
        self._attached.clear()
        if self.model.__dict__.get(_HANDLE_ATTR) is self:
            for key in _INSTANCE_ATTRS:
                self.model.__dict__.pop(key, None)
        self._removed = True
        logger.debug("removed %s", self.hook_name)

    @property
    def removed(self) -> bool:
        return self._removed

    def _refuse_pickle(self, protocol: int = 2) -> Any:
        """``pickle`` / ``torch.save(model)`` / ``copy.copy`` while applied: one clear error (the
        hooks are closures over this process's modules and cannot be pickled)."""
        raise TypeError(
            f"cannot pickle or shallow-copy a {type(self.model).__name__} with mmskip {self.config.technique!r} "
            "applied: save model.state_dict() (or save_pretrained) and apply the config again after loading, "
            "call handle.remove() first, or use copy.deepcopy(model), which re-applies the config to the copy"
        )

    def _deepcopy_model(self, memo: dict[int, Any]) -> torch.nn.Module:
        """``copy.deepcopy(model)`` while applied: a copy of the unmodified model with this config
        applied afresh (its own hooks and state; what this handle learned is not copied).

        The hooks hold closures over the original modules, which a plain deep copy would share,
        so they are detached for the copy and re-attached to the same modules, in order."""
        model = self.model
        for detach in reversed(self._hooked):
            detach()
        extras = {k: model.__dict__.pop(k) for k in _INSTANCE_ATTRS if k in model.__dict__}
        try:
            clone = copy.deepcopy(model, memo)
        finally:
            model.__dict__.update(extras)
            self._hooked = [attach_hook(m, hook, name) for m, hook, name in self._attached]
        apply(clone, self.config)
        return clone

    def __repr__(self) -> str:
        state = "removed" if self._removed else "active"
        return f"SkipHandle({self.config!r}, {state})"


def attach_hook(module: torch.nn.Module, hook: ModelHook, name: str) -> Callable[[], None]:
    """Register ``hook`` on ``module`` as ``name``; returns the function that removes it and
    deletes whatever the registry added (its ``_diffusers_hook`` and patched ``forward``), so the
    module is left exactly as it was."""
    had_registry = hasattr(module, "_diffusers_hook")
    had_forward = "forward" in module.__dict__
    from diffusers.hooks import HookRegistry  # the hook machinery loads when a technique first attaches

    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)

    def detach() -> None:
        registry = module._diffusers_hook
        registry.remove_hook(name, recurse=False)
        if not registry.hooks and not had_registry:
            del module._diffusers_hook
            if not had_forward and "forward" in module.__dict__:
                del module.__dict__["forward"]

    return detach


def _applied_technique(model: torch.nn.Module) -> tuple[str, str] | None:
    """(module path, hook name) of an mmskip hook already on ``model`` or any submodule."""
    for path, module in model.named_modules():
        registry = module.__dict__.get("_diffusers_hook")
        if registry is None:
            continue
        for name in registry.hooks:
            if name.startswith(_HOOK_PREFIX):
                return path or "(the model itself)", name
    return None


def apply(model: torch.nn.Module, config: SkipConfig) -> SkipHandle:
    """Attach ``config``'s technique to ``model`` and return the handle that removes it.

    One mmskip technique per model: applying a second one (to the model, one of its
    submodules, or a module that contains it) raises ``RuntimeError``; remove the first
    handle before applying another. Raises :class:`mmskip.registry.UnsupportedModelError` for a
    model no adapter knows.
    """
    if not isinstance(config, SkipConfig):
        raise TypeError(f"apply() takes an mmskip config (e.g. mmskip.LayerSkipConfig), got {type(config).__name__}")
    _check_model(model)
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing was compiled
    if eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        # torch.compile(model) wraps the model: hook the wrapped one, which the compiled code traces
        logger.debug("apply(): %s is torch.compile's wrapper; attaching to the model it compiles", type(model).__name__)
        model = model._orig_mod
    existing = model.__dict__.get(_HANDLE_ATTR)
    if existing is not None:
        raise RuntimeError(
            f"{type(model).__name__} already has {existing.config.technique!r} applied; "
            "call handle.remove() before applying another config"
        )
    found = _applied_technique(model)
    if found is not None:
        path, name = found
        raise RuntimeError(
            f"{type(model).__name__} already has mmskip technique {name.split('.')[1]!r} applied on {path}; mmskip "
            "applies one technique per model (techniques do not compose). Remove that handle first."
        )
    handle = SkipHandle(model, config)
    try:
        config._attach(model, handle)
    except BaseException:
        handle.remove()
        raise
    model.__dict__[_HANDLE_ATTR] = handle
    # copy.deepcopy and pickle look these up on the instance
    model.__dict__["__deepcopy__"] = handle._deepcopy_model
    model.__dict__["__reduce_ex__"] = handle._refuse_pickle
    logger.debug("applied %s to %s (%d hooks)", config.technique, type(model).__name__, len(handle._hooked))
    return handle


def _check_model(model: Any) -> None:
    """One clear error for what users pass instead of a ``torch.nn.Module``."""
    if isinstance(model, torch.nn.Module):
        return
    what = type(model).__name__
    if isinstance(model, tuple) and any(isinstance(x, torch.nn.Module) for x in model):
        hint = ("this looks like what mmskip.zoo.load() returns, (model, tokenizer): unpack it first, "
                "`model, tok = mmskip.zoo.load(name)`")
    elif hasattr(model, "components") and hasattr(model, "scheduler"):
        hint = ("this is a diffusers pipeline: pass its denoiser (`pipe.unet` / `pipe.transformer`) for a "
                "module-level technique, or use the drop-in pipeline (mmskip.pipelines.Skip*Pipeline"
                ".from_pipe(pipe, skip_config=...))")
    elif isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        hint = "load the model first (e.g. AutoModelForCausalLM.from_pretrained(path)) and pass the module"
    else:
        hint = "pass the torch.nn.Module itself"
    raise TypeError(f"mmskip.apply() takes a torch.nn.Module, got {what}: {hint}")


@contextmanager
def applied(model: torch.nn.Module, config: SkipConfig) -> Iterator[SkipHandle]:
    """``with mmskip.applied(model, config) as h: ...`` applies for the block, then removes."""
    handle = apply(model, config)
    try:
        yield handle
    finally:
        if not handle.removed:
            handle.remove()
