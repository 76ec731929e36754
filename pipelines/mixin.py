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
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from mmskip.diffusion.plan import SamplerConfig, SamplerPlan
from mmskip.diffusion.sampler import plan_sampler

from mmskip.inject import CallGuard, SkipConfig, SkipHandle, apply

__all__ = ["SkipPipelineMixin", "SKIP_CONFIG_NAME"]

logger = logging.getLogger(__name__)

SKIP_CONFIG_NAME = "mmskip_skip_config.json"


@dataclass
class _SkipState:
    """What an enabled pipeline holds: its configs, the denoiser's handle, the last call's plan."""

    configs: tuple[SkipConfig, ...]
    handle: SkipHandle | None
    samplers: tuple[SamplerConfig, ...]
    last_plan: SamplerPlan | None = None


class SkipPipelineMixin:
    """Mixed in before a diffusers pipeline class: ``class X(SkipPipelineMixin, StableDiffusionPipeline)``."""

    _mmskip_denoiser: ClassVar[str] = "unet"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, skip_config: Any = None, **kwargs: Any) -> Any:
        """The parent's ``from_pretrained``, then ``enable_skip(skip_config)``; without ``skip_config``
        the configs a Skip pipeline saved in the folder (``mmskip_skip_config.json``) are enabled."""
        pipe = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
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
        plus the enabled skip configs in ``mmskip_skip_config.json``."""
        super().save_pretrained(save_directory, *args, **kwargs)
        folder = Path(save_directory)
        index = folder / "model_index.json"
        if index.is_file():
            data = json.loads(index.read_text())
            data["_class_name"] = _diffusers_parent(type(self)).__name__
            index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        target = folder / SKIP_CONFIG_NAME
        state = self._skip_state()
        if state is not None:
            payload = {"configs": [c.to_dict() for c in state.configs]}
            target.write_text(json.dumps(payload, indent=2) + "\n")
        elif target.exists():
            target.unlink()

    # -- public -----------------------------------------------------------------------------
    def enable_skip(self, config: Any) -> None:
        """Enable one config or a list of them (one per technique), replacing the enabled ones.

        Atomic: a config that is invalid (wrong type, two of a kind, an unknown target, a
        missing stats file) raises and leaves the previously enabled configs in place.
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
        denoiser = self._denoiser()
        old = self._skip_state()
        handle = None
        if models:
            if old is not None and old.handle is not None and not old.handle.removed:
                old.handle.remove()
            try:
                handle = apply(denoiser, models[0])
            except BaseException:
                if old is not None and old.handle is not None:
                    old.handle = apply(denoiser, old.handle.config)  # put the previous technique back
                raise
        elif old is not None and old.handle is not None and not old.handle.removed:
            old.handle.remove()
        self.__dict__["_mmskip"] = _SkipState(configs=configs, handle=handle, samplers=samplers)
        self.__dict__.setdefault("_mmskip_guard", CallGuard("pipeline"))
        logger.debug("%s: enabled %s", type(self).__name__, [c.technique for c in configs])

    def disable_skip(self) -> None:
        """Remove every mmskip technique; the pipeline then computes exactly what its parent does."""
        state = self.__dict__.pop("_mmskip", None)
        if state is not None and state.handle is not None and not state.handle.removed:
            state.handle.remove()

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
        state = self._skip_state()
        return state.handle if state is not None else None

    def skip_stats(self) -> dict[str, Any]:
        """The model-level technique's stats of the last call plus the grid steps the sampler visited."""
        state = self._skip_state()
        if state is None:
            return {}
        out = state.handle.stats() if state.handle is not None else {}
        if state.last_plan is not None:
            out["visited_steps"] = list(state.last_plan.keep)
        return out

    # -- the call -------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        state = self._skip_state()
        if state is None:
            return super().__call__(*args, **kwargs)
        with self.__dict__["_mmskip_guard"].call(starts=True):
            return self._skip_call(state, args, kwargs)

    def _skip_call(self, state: _SkipState, args: tuple, kwargs: dict) -> Any:
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
        state.last_plan = plan
        if state.handle is not None:
            state.handle.reset_stats()
            begin = getattr(state.handle.state, "begin", None)
            if begin is not None:
                begin(n, plan.keep)
        if planned is None:
            return super().__call__(*args, **kwargs)
        original = self.scheduler
        if plan.first_step is not None and callable(getattr(self, "prepare_latents", None)):
            prepare, first_step = self.prepare_latents, plan.first_step

            def prepare_latents(*a: Any, **k: Any) -> Any:
                return first_step(prepare(*a, **k), planned)

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
    """The configs a Skip pipeline's ``save_pretrained`` wrote (``mmskip_skip_config.json``)."""
    p = Path(path)
    if p.is_dir():
        p = p / SKIP_CONFIG_NAME
    data = json.loads(p.read_text())
    return [SkipConfig.from_dict(d) for d in data["configs"]]


def _diffusers_parent(cls: type) -> type:
    for base in cls.__mro__:
        if base.__module__.startswith("diffusers."):
            return base
    raise TypeError(f"{cls.__name__} has no diffusers pipeline base class")
