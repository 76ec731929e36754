"""``SkipPipelineMixin``: what every mmskip drop-in pipeline adds to its diffusers parent class.

``from_pretrained(path, skip_config=...)``, ``enable_skip(config)``, ``disable_skip()``,
``skip_stats()`` and ``save_pretrained`` (which stores the skip configs beside the pipeline).
Configs come in two kinds:

* **model-level** (``FeatureInheritanceConfig``): applied to the denoiser (``unet`` /
  ``transformer``) with :func:`mmskip.apply`; at most one;
* **sampler-level** (:class:`mmskip.diffusion.SamplerConfig`: ``StepSkipConfig``,
  ``GaussianTeleportConfig``, ...): at the start of each call every one is validated for the
  call's ``num_inference_steps``, refines a :class:`mmskip.diffusion.SamplerPlan` and may route
  the denoiser's calls (``route``); the call then runs on a planned copy of the scheduler (the
  pipeline's own scheduler is never modified).

The pipeline calls only the methods these configs and their states declare
(:mod:`mmskip.diffusion.plan`, :class:`mmskip.inject.TechniqueState`); the running call's plan
lives in a :class:`~mmskip.pipelines.skip_call.SkipCall` that the mixin's ``scheduler``,
``prepare_latents`` and ``get_timesteps`` consult.

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from mmskip.diffusion.plan import SamplerConfig, SamplerPlan, SamplerRoute
from mmskip.diffusion.tracker import serving_this_thread

from mmskip._config_files import SKIP_CONFIG_NAME, read_configs, write_configs
from mmskip.inject import CallGuard, SkipConfig, SkipHandle, applied, apply

from .skip_call import SkipCall, hooking, plan_call, strength_steps, validate

__all__ = ["SkipPipelineMixin", "SKIP_CONFIG_NAME"]

logger = logging.getLogger(__name__)



@dataclass
class _SkipState:
    """What an enabled pipeline holds: its configs, the last call's handle, plan and routes, measured costs."""

    configs: tuple[SkipConfig, ...]
    model: SkipConfig | None
    samplers: tuple[SamplerConfig, ...]
    last_plan: SamplerPlan | None = None
    last_handle: SkipHandle | None = None
    costs: tuple[dict[str, float], float] | None = None
    last_routes: tuple[SamplerRoute, ...] = ()


class SkipPipelineMixin:
    """Mixed in before a diffusers pipeline class: ``class X(SkipPipelineMixin, StableDiffusionPipeline)``.

    Class-level facts a drop-in declares: ``_mmskip_denoiser`` (the component the techniques
    hook: ``"unet"`` or ``"transformer"``) and ``_mmskip_prepares_latents`` (the parent draws
    its initial latents in ``prepare_latents``, where the analytic first step maps them; checked
    against the parent when the class is made).

    During an enabled call the mixin's ``scheduler`` is the call's planned sampler, and its
    ``prepare_latents`` / ``get_timesteps`` (called by the parent's ``__call__``) apply the call's
    plan (:class:`~mmskip.pipelines.skip_call.SkipCall`, :meth:`_skip_call_now`): ordinary class
    members that a subclass sees and may extend; nothing is patched on the instance.
    """

    _mmskip_denoiser: ClassVar[str] = "unet"
    _mmskip_prepares_latents: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        parent = _diffusers_parent(cls)
        if hasattr(parent, "prepare_latents") != cls._mmskip_prepares_latents:  # diffusers' API, once per class
            raise TypeError(
                f"{cls.__name__}: set _mmskip_prepares_latents = {not cls._mmskip_prepares_latents} (whether "
                f"{parent.__name__} draws its latents in prepare_latents)"
            )
        parent_call = parent.__call__

        @functools.wraps(parent_call)  # the parent's signature and docstring, for users and tools
        def __call__(self: SkipPipelineMixin, *args: Any, **kwargs: Any) -> Any:
            return self._skip_dispatch(args, kwargs)

        cls.__call__ = __call__

    # -- what the parent's __call__ reads: the call's plan applies ---------------------------------
    @property
    def scheduler(self) -> Any:
        """The pipeline's scheduler; during an enabled call that skips steps, the call's planned
        copy of it (the pipeline's own is never modified)."""
        call = self._skip_call_now()
        if call is not None and call.planned is not None:
            return call.planned
        try:
            return self.__dict__["scheduler"]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no scheduler yet") from None

    @scheduler.setter
    def scheduler(self, value: Any) -> None:
        self.__dict__["scheduler"] = value

    def prepare_latents(self, *args: Any, **kwargs: Any) -> Any:
        """The parent's ``prepare_latents``; in a call with analytic early steps, the latents mapped
        to the state at the first visited grid step (inpainting's tuple: its first entry)."""
        out = super().prepare_latents(*args, **kwargs)
        call = self._skip_call_now()
        if call is None or not call.via_latents:
            return out
        first_step = call.plan.first_step
        if isinstance(out, tuple):  # inpainting: (latents, noise, image_latents, ...)
            return (first_step(out[0], call.planned), *out[1:])
        return first_step(out, call.planned)

    def get_timesteps(self, *args: Any, **kwargs: Any) -> Any:
        """The parent's ``get_timesteps`` (img2img / inpainting: ``strength`` < 1 runs the last
        steps); in an enabled call, mapped onto the call's grid
        (:func:`~mmskip.pipelines.skip_call.strength_steps`)."""
        call = self._skip_call_now()
        if call is None:
            return super().get_timesteps(*args, **kwargs)
        return strength_steps(call, super().get_timesteps, self.scheduler, args, kwargs)

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

    @classmethod
    def from_pipe(cls, pipeline: Any, skip_config: Any = None, **kwargs: Any) -> Any:
        """The parent's ``from_pipe`` (a pipeline of this class sharing ``pipeline``'s components), then
        ``enable_skip(skip_config)`` when one is given: ``SkipFluxPipeline.from_pipe(pipe, skip_config=cfg)``."""
        pipe = super().from_pipe(pipeline, **kwargs)
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
            write_configs(state.configs, folder)
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
        validate(configs, None)
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
        for route in state.last_routes:
            out.update(route.stats())
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
        call = plan_call(self.scheduler, state.configs, state.samplers, n, self._mmskip_prepares_latents)
        routes = call.routes = tuple(r for r in (c.route(call.plan) for c in state.samplers) if r is not None)
        hooks = state.model is not None or bool(routes)
        with hooking(self._denoiser() if hooks else None), serving_this_thread():
            state.last_plan = call.plan
            self.__dict__["_mmskip_call"] = call
            try:
                return self._hooked_call(state, call, routes, args, kwargs)
            finally:
                del self.__dict__["_mmskip_call"]
                state.last_plan = call.plan

    def _hooked_call(self, state: _SkipState, call: SkipCall, routes: tuple[SamplerRoute, ...], args: tuple,
                     kwargs: dict) -> Any:
        """Attach this call's techniques (bound to this thread), run, and remove them."""
        # routes (multi-UNet switching) hook in first, inside the model-level technique's hooks,
        # so that it still sees every step
        attached: list[SamplerRoute] = []
        handle = None
        try:
            for route in routes:
                route.attach(self._denoiser())
                attached.append(route)
            state.last_routes = routes
            if state.model is not None:
                handle = apply(self._denoiser(), state.model)  # for this call only
                if state.costs is not None:
                    handle.state.adopt_costs(*state.costs)
                handle.state.begin_call(call.plan.num_steps, call.plan.keep)
                call.handle = state.last_handle = handle
            return super().__call__(*args, **kwargs)
        finally:
            if handle is not None:
                try:
                    handle.state.end_call()
                finally:
                    handle.remove()
                if state.costs is None:
                    state.costs = handle.state.measured_costs()
            for route in reversed(attached):
                route.remove()

    def _skip_call_now(self) -> SkipCall | None:
        """The enabled call running now (``None`` between calls and in a disabled pipeline)."""
        return self.__dict__.get("_mmskip_call")

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
        sig = _call_signature(type(self))
        arguments = sig.bind_partial(*args, **kwargs).arguments if args else kwargs  # keywords: by name already
        custom = arguments.get("timesteps")
        if custom is None:
            custom = arguments.get("sigmas")
        if custom is not None:
            if not custom_ok:
                raise ValueError(
                    "custom timesteps/sigmas cannot be combined with step skipping or teleport; pass num_inference_steps"
                )
            return len(custom)
        if arguments.get("num_inference_steps") is not None:
            return int(arguments["num_inference_steps"])
        return int(sig.parameters["num_inference_steps"].default)


@functools.cache
def _call_signature(cls: type) -> inspect.Signature:
    """The parent pipeline's ``__call__`` signature (without ``self``) of drop-in class ``cls``, read once."""
    sig = inspect.signature(super(SkipPipelineMixin, cls).__call__)
    return sig.replace(parameters=list(sig.parameters.values())[1:])


def load_skip_configs(path: str | Path) -> list[SkipConfig]:
    """The configs a Skip pipeline's ``save_pretrained`` wrote (``mmskip_skip_config.json``); file
    names relative to the folder (the copied Gaussian stats) are resolved against it."""
    return read_configs(path)


def _diffusers_parent(cls: type) -> type:
    for base in cls.__mro__:
        if base.__module__.startswith("diffusers."):
            return base
    raise TypeError(f"{cls.__name__} has no diffusers pipeline base class")
