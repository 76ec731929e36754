"""``SkipPipelineMixin``: what every mmskip drop-in pipeline adds to its diffusers parent class.

``from_pretrained(path, skip_config=...)``, ``enable_skip(config)``, ``disable_skip()``,
``skip_stats()`` and ``save_pretrained`` (which stores the skip configs beside the pipeline).
Configs come in two kinds:

* **model-level** (``FeatureInheritanceConfig``): applied to the denoiser (``unet`` /
  ``transformer``) with :func:`mmskip.apply`; at most one;
* **sampler-level** (:class:`mmskip.diffusion.SamplerConfig`: ``StepSkipConfig``,
  ``GaussianTeleportConfig``, ...): at the start of each call every one is validated for the
  call's ``num_inference_steps`` and refines a :class:`mmskip.diffusion.SamplerPlan`; the call
  then runs on a planned copy of the scheduler (the pipeline's own scheduler is never modified).

Every step number (in any schedule) is an index of the call's ``num_inference_steps`` grid.
With skipping disabled, ``__call__`` is the parent's, unchanged.

**Who owns the skipping: the pipeline, per call.** ``enable_skip`` only validates and stores the
configs; each call of an enabled pipeline applies its model-level technique to the denoiser
for that call and removes it when the call ends (FLOPs are measured on the first call and
reused). Between calls the denoiser carries no hooks, so pipelines that share it
(``Skip*Pipeline(**pipe.components)``, ``from_pipe``, a plain diffusers pipeline) compute
exactly what their own settings say: a disabled or plain pipeline never skips. During a call
its hooks are bound to the call's thread: a plain pipeline running the shared denoiser from
another thread at the same time passes through them and gets its own exact output, and the
call's state never sees it. Two Skip calls that would both attach hooks to one denoiser at the
same time are refused (:class:`mmskip.ConcurrentUseError`, before anything changes), as are
two calls of one Skip pipeline.

The drop-ins expose their parent's ``__call__`` signature and docstring (``inspect.signature``,
``from_pipe`` and UIs see every argument: ``timesteps``, ``callback_on_step_end``, ...).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from mmskip.diffusion.plan import SamplerConfig, SamplerPlan
from mmskip.diffusion.sampler import plan_sampler
from mmskip.diffusion.tracker import serving_this_thread

from mmskip.inject import CallGuard, ConcurrentUseError, SkipConfig, SkipHandle, applied, apply

__all__ = ["SkipPipelineMixin", "SKIP_CONFIG_NAME"]

logger = logging.getLogger(__name__)

SKIP_CONFIG_NAME = "mmskip_skip_config.json"


@dataclass
class _SkipState:
    """What an enabled pipeline holds: its configs, the last call's handle and plan, measured costs."""

    configs: tuple[SkipConfig, ...]
    model: SkipConfig | None
    samplers: tuple[SamplerConfig, ...]
    last_plan: SamplerPlan | None = None
    last_handle: SkipHandle | None = None
    costs: tuple[dict[str, float], float] | None = None
    last_routes: list[Any] = field(default_factory=list)


class SkipPipelineMixin:
    """Mixed in before a diffusers pipeline class: ``class X(SkipPipelineMixin, StableDiffusionPipeline)``."""

    _mmskip_denoiser: ClassVar[str] = "unet"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        parent_call = _diffusers_parent(cls).__call__

        @functools.wraps(parent_call)  # the parent's signature and docstring, for users and tools
        def __call__(self: SkipPipelineMixin, *args: Any, **kwargs: Any) -> Any:
            return self._skip_dispatch(args, kwargs)

        cls.__call__ = __call__

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, skip_config: Any = None, **kwargs: Any) -> Any:
        """The parent's ``from_pretrained``, then ``enable_skip(skip_config)``; without ``skip_config``
        the configs a Skip pipeline saved in the folder (``mmskip_skip_config.json``) are enabled;
        ``skip_config=[]`` loads the folder with skipping disabled."""
        pipe = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if isinstance(skip_config, (list, tuple)) and not skip_config:
            return pipe  # explicitly none: the saved configs are not enabled
        if skip_config is None:
            saved = Path(str(pretrained_model_name_or_path)) / SKIP_CONFIG_NAME
            if saved.is_file():
                skip_config = load_skip_configs(saved)
                logger.debug("enabling the skip configs saved in %s", saved)
        if skip_config is not None:
            pipe.enable_skip(skip_config)
        return pipe

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> None:
        """The parent's ``save_pretrained`` under the parent's class name (so plain diffusers loads it),
        plus the enabled skip configs in ``mmskip_skip_config.json``; files the configs read (Gaussian
        stats) are copied into the folder and stored relative to it, so the folder loads from anywhere."""
        state = self._skip_state()
        for c in state.samplers if state is not None else ():
            c.validate(None)  # a file a config reads is still there, before anything is written
        super().save_pretrained(save_directory, *args, **kwargs)
        folder = Path(save_directory)
        index = folder / "model_index.json"
        if index.is_file():
            data = json.loads(index.read_text())
            data["_class_name"] = _diffusers_parent(type(self)).__name__
            index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        target = folder / SKIP_CONFIG_NAME
        if state is not None:
            saved = [c.saved_in(folder) if isinstance(c, SamplerConfig) else c for c in state.configs]
            payload = {"configs": [c.to_dict() for c in saved]}
            target.write_text(json.dumps(payload, indent=2) + "\n")
        elif target.exists():
            target.unlink()

    # -- public -----------------------------------------------------------------------------
    def enable_skip(self, config: Any) -> None:
        """Enable one config or a list of them (one per technique), replacing the enabled ones.

        Atomic: a config that is invalid (wrong type, two of a kind, an unknown target, a
        missing stats file) raises and leaves the previously enabled configs in place. Nothing
        is attached to the denoiser until a call runs (see the module docstring).
        """
        configs = tuple(config) if isinstance(config, (list, tuple)) else (config,)
        if not configs:
            raise ValueError("enable_skip() needs at least one config")
        seen: set[type] = set()
        for c in configs:
            if not isinstance(c, SkipConfig):
                raise TypeError(
                    f"{type(self).__name__}.enable_skip() takes mmskip configs (FeatureInheritanceConfig, "
                    f"StepSkipConfig, GaussianTeleportConfig, ...); got {type(c).__name__}"
                )
            if type(c) in seen:
                raise ValueError(f"two {type(c).__name__} configs given; pass one of each technique")
            seen.add(type(c))
        samplers = tuple(c for c in configs if isinstance(c, SamplerConfig))
        models = [c for c in configs if not isinstance(c, SamplerConfig)]
        if len(models) > 1:
            names = ", ".join(type(c).__name__ for c in models)
            raise ValueError(f"one model-level technique per denoiser (mmskip.apply); got {names}")
        for c in configs:
            validate = getattr(c, "validate", None)
            if validate is not None:
                validate(None)
        if models:  # attach once to check targets and adapter now, not at the first call
            with applied(self._denoiser(), models[0]):
                pass
        self.__dict__["_mmskip"] = _SkipState(configs=configs, model=models[0] if models else None, samplers=samplers)
        self.__dict__.setdefault("_mmskip_guard", CallGuard("pipeline"))
        logger.debug("%s: enabled %s", type(self).__name__, [c.technique for c in configs])

    def disable_skip(self) -> None:
        """Forget the enabled configs; the pipeline then computes exactly what its parent does."""
        self.__dict__.pop("_mmskip", None)

    @property
    def skip_enabled(self) -> bool:
        return self._skip_state() is not None

    @property
    def skip_configs(self) -> tuple[SkipConfig, ...]:
        """The enabled configs (empty when disabled)."""
        state = self._skip_state()
        return state.configs if state is not None else ()

    @property
    def skip_handle(self) -> SkipHandle | None:
        """The model-level technique's handle of the last call (removed when the call ended)."""
        state = self._skip_state()
        return state.last_handle if state is not None else None

    def skip_stats(self) -> dict[str, Any]:
        """The model-level technique's stats of the last call plus the grid steps the sampler visited."""
        state = self._skip_state()
        if state is None:
            return {}
        out = state.last_handle.stats() if state.last_handle is not None else {}
        if state.last_plan is not None:
            out["visited_steps"] = list(state.last_plan.keep)
        for hook in state.last_routes:
            if hook is not None:
                out["full_unet_steps"], out["light_unet_steps"] = list(hook.steps_full), list(hook.steps_light)
        return out

    # -- the call -------------------------------------------------------------------------------
    def _skip_dispatch(self, args: tuple, kwargs: dict) -> Any:
        state = self._skip_state()
        if state is None:
            return super().__call__(*args, **kwargs)
        with self.__dict__["_mmskip_guard"].call(starts=True):
            return self._skip_call(state, args, kwargs)

    def _check_components(self) -> None:
        """Refuse components the enabled techniques cannot run with (drop-ins override this)."""

    def _skip_call(self, state: _SkipState, args: tuple, kwargs: dict) -> Any:
        self._check_components()
        n = self._num_steps(args, kwargs, custom_ok=not state.samplers)
        # validate and plan everything before anything changes
        for c in state.configs:
            validate = getattr(c, "validate", None)
            if validate is not None:
                validate(n)
        plan = SamplerPlan.full(n)
        for c in state.samplers:
            plan = c.plan(self.scheduler, plan)
        planned = None
        if not plan.is_full:
            via_latents = plan.first_step is not None and callable(getattr(self, "prepare_latents", None))
            planned = plan_sampler(self.scheduler, n, plan.keep, None if via_latents else plan.first_step)
            if via_latents:
                # teleport the latents as the pipeline prepares them (flow-matching pipelines never
                # call scale_model_input); the grid must be known first
                try:
                    planned.set_timesteps(n)
                except (TypeError, ValueError) as err:
                    raise ValueError(
                        f"analytic early steps need the sampler's grid before sampling; {type(self.scheduler).__name__}"
                        f" could not build it without pipeline arguments ({err})"
                    ) from err
        hooks = state.model is not None or any(callable(getattr(c, "route", None)) for c in state.samplers)
        with _hooking(self._denoiser() if hooks else None), serving_this_thread():
            state.last_plan = plan
            return self._hooked_call(state, planned, plan, n, args, kwargs)

    def _hooked_call(self, state: _SkipState, planned: Any, plan: SamplerPlan, n: int, args: tuple, kwargs: dict) -> Any:
        """Attach this call's techniques (bound to this thread), run, and remove them."""
        # sampler configs that route denoiser calls (multi-UNet switching) hook in first, inside
        # the model-level technique's hooks, so that it still sees every step
        routes: list[Callable[[], None]] = []
        handle = None
        try:
            for c in state.samplers:
                if callable(getattr(c, "route", None)):
                    routes.append(c.route(self._denoiser(), n, plan.keep))
            state.last_routes = [getattr(r, "hook", None) for r in routes]
            if state.model is not None:
                handle = apply(self._denoiser(), state.model)  # for this call only
                if state.costs is not None and hasattr(handle.state, "adopt_costs"):
                    handle.state.adopt_costs(*state.costs)
                begin = getattr(handle.state, "begin", None)
                if begin is not None:
                    begin(n, plan.keep)
                state.last_handle = handle
            return self._run(planned, plan, args, kwargs, handle)
        finally:
            if handle is not None:
                handle.remove()
                measured = getattr(handle.state, "measured_costs", None)
                if state.costs is None and measured is not None:
                    state.costs = measured()
            for remove in reversed(routes):
                remove()

    def _run(self, planned: Any, plan: SamplerPlan, args: tuple, kwargs: dict, handle: SkipHandle | None) -> Any:
        if callable(getattr(self, "get_timesteps", None)):  # img2img / inpainting: strength < 1 runs the last steps
            self.__dict__["get_timesteps"] = self._strength_steps(planned, plan, handle)
        try:
            return self._run_planned(planned, plan, args, kwargs)
        finally:
            self.__dict__.pop("get_timesteps", None)

    def _strength_steps(self, planned: Any, plan: SamplerPlan, handle: SkipHandle | None) -> Any:
        """Wrap the pipeline's ``get_timesteps(n, strength, ...)``: learn which grid steps a
        ``strength`` < 1 call runs (``t_start..n-1``), map the plan onto them and tell the
        model-level technique, so every schedule keeps indexing the full ``n``-step grid."""
        original, n = self.get_timesteps, plan.num_steps

        def get_timesteps(*args: Any, **kwargs: Any) -> Any:
            # Flux img2img passes the length of the (planned) grid it got back; the rule needs n
            bound = inspect.signature(original).bind(*args, **kwargs)
            bound.arguments["num_inference_steps"] = n
            args, kwargs = bound.args, bound.kwargs
            sched = self.scheduler
            if planned is not None:  # let the pipeline's own rule slice the full grid
                kept, sched.timesteps = sched.timesteps, sched.full_timesteps
            try:
                timesteps, _ = original(*args, **kwargs)
            finally:
                if planned is not None:
                    sched.timesteps = kept
            order = getattr(sched, "order", 1)
            t_start = n - len(timesteps) // order
            if t_start >= n:  # diffusers' img2img/inpainting refuse (or fail on) this too
                strength = bound.arguments.get("strength")
                raise ValueError(
                    f"strength={strength} runs none of the {n} denoising steps (the pipeline runs "
                    f"int(num_inference_steps * strength) of them); pass strength >= 1/num_inference_steps "
                    f"({1 / n:.3g} here) or more num_inference_steps"
                )
            if t_start == 0:
                return original(*args, **kwargs) if planned is not None else (timesteps, n)
            if plan.first_step is not None:
                raise ValueError(
                    f"strength < 1 starts from the noised input image at grid step {t_start}; the analytic "
                    "early-step jump (GaussianTeleportConfig) starts from pure noise. Pass strength=1 or drop it"
                )
            visited = tuple(k for k in plan.keep if k >= t_start)
            if not visited:
                raise ValueError(
                    f"this call runs grid steps {t_start}..{n - 1} (strength), where the step-skip plan visits "
                    f"none of {list(plan.keep)}; use a schedule that keeps some of the last steps"
                )
            if planned is not None:
                pos = (len(plan.keep) - len(visited)) * order
                timesteps = planned.timesteps[pos:]
                if hasattr(planned, "set_begin_index"):
                    planned.set_begin_index(pos)
            begin = getattr(getattr(handle, "state", None), "begin", None)
            if begin is not None:
                begin(n, visited)
            self.__dict__["_mmskip"].last_plan = SamplerPlan(n, visited, plan.first_step)
            logger.debug("strength: grid steps %d..%d run; visiting %s", t_start, n - 1, list(visited))
            return timesteps, len(visited)

        return get_timesteps

    def _run_planned(self, planned: Any, plan: SamplerPlan, args: tuple, kwargs: dict) -> Any:
        if planned is None:
            return super().__call__(*args, **kwargs)
        original = self.scheduler
        if plan.first_step is not None and callable(getattr(self, "prepare_latents", None)):
            prepare, first_step = self.prepare_latents, plan.first_step

            def prepare_latents(*a: Any, **k: Any) -> Any:
                out = prepare(*a, **k)
                if isinstance(out, tuple):  # inpainting: (latents, noise, image_latents, ...)
                    return (first_step(out[0], planned), *out[1:])
                return first_step(out, planned)

            self.__dict__["prepare_latents"] = prepare_latents
        self.__dict__["scheduler"] = planned
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self.__dict__["scheduler"] = original
            self.__dict__.pop("prepare_latents", None)

    # -- helpers --------------------------------------------------------------------------------
    def _skip_state(self) -> _SkipState | None:
        return self.__dict__.get("_mmskip")

    def _denoiser(self) -> Any:
        model = getattr(self, self._mmskip_denoiser, None)
        if model is None:
            raise ValueError(f"{type(self).__name__} has no {self._mmskip_denoiser}")
        return model

    def _num_steps(self, args: Sequence[Any], kwargs: dict[str, Any], custom_ok: bool) -> int:
        """The call's grid size: ``num_inference_steps`` (or the length of custom ``timesteps`` /
        ``sigmas``, which sampler-level techniques refuse)."""
        parent = super().__call__
        sig = inspect.signature(parent)
        bound = sig.bind_partial(*args, **kwargs)
        custom = bound.arguments.get("timesteps")
        if custom is None:
            custom = bound.arguments.get("sigmas")
        if custom is not None:
            if not custom_ok:
                raise ValueError(
                    "custom timesteps/sigmas cannot be combined with step skipping or teleport; pass num_inference_steps"
                )
            return len(custom)
        if bound.arguments.get("num_inference_steps") is not None:
            return int(bound.arguments["num_inference_steps"])
        return int(sig.parameters["num_inference_steps"].default)


def load_skip_configs(path: str | Path) -> list[SkipConfig]:
    """The configs a Skip pipeline's ``save_pretrained`` wrote (``mmskip_skip_config.json``); file
    names relative to the folder (the copied Gaussian stats) are resolved against it."""
    p = Path(path)
    if p.is_dir():
        p = p / SKIP_CONFIG_NAME
    data = json.loads(p.read_text())
    configs = [SkipConfig.from_dict(d) for d in data["configs"]]
    return [c.loaded_from(p.parent) if isinstance(c, SamplerConfig) else c for c in configs]


_HOOKED: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()  # denoiser -> thread hooking it
_HOOKED_LOCK = threading.Lock()


@contextmanager
def _hooking(denoiser: Any) -> Iterator[None]:
    """Hold ``denoiser`` for one Skip call that attaches hooks to it (``None``: none attached).

    A Skip call of another thread that would hook the same denoiser meanwhile is refused with
    :class:`ConcurrentUseError` before anything changes; plain calls from other threads are not
    held here: they pass through this call's hooks (see :mod:`mmskip.diffusion.tracker`).
    """
    if denoiser is None:
        yield
        return
    if isinstance(denoiser, torch._dynamo.eval_frame.OptimizedModule):
        denoiser = denoiser._orig_mod  # the module the hooks go on
    me = threading.get_ident()
    with _HOOKED_LOCK:
        holder = _HOOKED.get(denoiser)
        if holder is not None and holder != me:
            raise ConcurrentUseError(
                f"another pipeline call (thread {holder}) is running this {type(denoiser).__name__} with mmskip "
                "techniques attached; two pipelines sharing a denoiser cannot skip at the same time. Serialize the "
                "calls (e.g. a lock around them) or give each pipeline its own denoiser copy."
            )
        _HOOKED[denoiser] = me
    try:
        yield
    finally:
        if holder is None:
            with _HOOKED_LOCK:
                _HOOKED.pop(denoiser, None)


def _diffusers_parent(cls: type) -> type:
    for base in cls.__mro__:
        if base.__module__.startswith("diffusers."):
            return base
    raise TypeError(f"{cls.__name__} has no diffusers pipeline base class")
