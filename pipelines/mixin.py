"""``SkipPipelineMixin``: what every mmskip drop-in pipeline adds to its diffusers parent class.

``from_pretrained(path, skip_config=...)``, ``enable_skip(config)``, ``disable_skip()`` and
``skip_stats()``. Feature inheritance is applied to the denoiser (``unet`` / ``transformer``)
with :func:`mmskip.inject.apply`; step skipping and the analytic Gaussian early steps run the
call on a planned copy of the scheduler (the pipeline's own scheduler is never modified).
With skipping disabled, ``__call__`` is the parent's, unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, ClassVar

from mmskip.diffusion.gaussian import GaussianStats, GaussianTeleportConfig, teleport_step
from mmskip.diffusion.inheritance import FeatureInheritanceConfig
from mmskip.diffusion.sampler import plan_sampler
from mmskip.diffusion.step_skip import StepSkipConfig

from mmskip.inject import SkipHandle, apply

__all__ = ["SkipPipelineMixin"]

_KINDS = (FeatureInheritanceConfig, StepSkipConfig, GaussianTeleportConfig)


class SkipPipelineMixin:
    """Mixed in before a diffusers pipeline class: ``class X(SkipPipelineMixin, StableDiffusionPipeline)``."""

    _mmskip_denoiser: ClassVar[str] = "unet"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, skip_config: Any = None, **kwargs: Any) -> Any:
        pipe = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if skip_config is not None:
            pipe.enable_skip(skip_config)
        return pipe

    # -- public -----------------------------------------------------------------------------
    def enable_skip(self, config: Any) -> None:
        """Enable one config or a list of them (at most one of each technique); replaces earlier ones."""
        configs = list(config) if isinstance(config, (list, tuple)) else [config]
        if not configs:
            raise ValueError("enable_skip() needs at least one config")
        seen: dict[type, Any] = {}
        for c in configs:
            if not isinstance(c, _KINDS):
                names = ", ".join(k.__name__ for k in _KINDS)
                raise TypeError(f"{type(self).__name__}.enable_skip() takes {names}; got {type(c).__name__}")
            if type(c) in seen:
                raise ValueError(f"two {type(c).__name__} configs given; pass one of each technique")
            seen[type(c)] = c
        self.disable_skip()
        teleport = seen.get(GaussianTeleportConfig)
        stats = GaussianStats.load(teleport.stats_path) if teleport is not None else None
        inherit = seen.get(FeatureInheritanceConfig)
        handle = apply(self._denoiser(), inherit) if inherit is not None else None
        self.__dict__["_mmskip"] = {
            "handle": handle,
            "steps": seen.get(StepSkipConfig),
            "teleport": teleport,
            "stats": stats,
            "last_keep": None,
        }

    def disable_skip(self) -> None:
        """Remove every mmskip technique; the pipeline then computes exactly what its parent does."""
        state = self.__dict__.pop("_mmskip", None)
        if state and state["handle"] is not None and not state["handle"].removed:
            state["handle"].remove()

    @property
    def skip_enabled(self) -> bool:
        return "_mmskip" in self.__dict__

    @property
    def skip_handle(self) -> SkipHandle | None:
        state = self.__dict__.get("_mmskip")
        return state["handle"] if state else None

    def skip_stats(self) -> dict[str, Any]:
        """Feature-inheritance stats of the last call plus the sampler steps visited."""
        state = self.__dict__.get("_mmskip")
        if not state:
            return {}
        out = state["handle"].stats() if state["handle"] is not None else {}
        if state["last_keep"] is not None:
            out["visited_steps"] = list(state["last_keep"])
        return out

    # -- the call -------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        state = self.__dict__.get("_mmskip")
        if not state:
            return super().__call__(*args, **kwargs)
        n = self._num_steps(args, kwargs)
        keep = list(range(n))
        if state["steps"] is not None:
            keep = state["steps"].keep(n)
        first_step = None
        if state["teleport"] is not None:
            start = state["teleport"].start(n)
            keep = sorted({start} | {k for k in keep if k >= start})
            first_step = teleport_step(state["stats"], start) if start > 0 else None
        state["last_keep"] = keep
        if state["handle"] is not None:
            state["handle"].reset_stats()
            state["handle"].state.tracker.begin(len(keep))
        if keep == list(range(n)):
            return super().__call__(*args, **kwargs)
        original = self.scheduler
        via_latents = first_step is not None and callable(getattr(self, "prepare_latents", None))
        planned = plan_sampler(original, n, keep, None if via_latents else first_step)
        if via_latents:
            # teleport the latents as the pipeline prepares them (flow-matching pipelines never
            # call scale_model_input); the grid must be known first
            try:
                planned.set_timesteps(n)
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"analytic early steps need the sampler's grid before sampling; {type(original).__name__} "
                    f"could not build it without pipeline arguments ({err})"
                ) from err
            prepare = self.prepare_latents

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
    def _denoiser(self) -> Any:
        model = getattr(self, self._mmskip_denoiser, None)
        if model is None:
            raise ValueError(f"{type(self).__name__} has no {self._mmskip_denoiser}")
        return model

    def _num_steps(self, args: Sequence[Any], kwargs: dict[str, Any]) -> int:
        parent = super().__call__
        sig = inspect.signature(parent)
        bound = sig.bind_partial(*args, **kwargs)
        if bound.arguments.get("num_inference_steps") is not None:
            return int(bound.arguments["num_inference_steps"])
        if bound.arguments.get("timesteps") is not None or bound.arguments.get("sigmas") is not None:
            raise ValueError("custom timesteps/sigmas cannot be combined with step skipping or teleport")
        return int(sig.parameters["num_inference_steps"].default)
