"""Tuning a diffusers pipeline with ``mmskip.tune``: steps, sampler, mmskip's techniques and diffusers' caches.

:class:`PipelineTarget` wraps an ``mmskip.pipelines`` drop-in (or a plain diffusers pipeline, run
through its drop-in class with the same module objects). Inputs are prompts (text-to-image),
class labels (DiT-style class-conditional pipelines) or dicts of call arguments; each input is
generated alone with a seed fixed by its content, so splitting inputs into calibration and
held-out sets never changes an image (a dict input may set its own ``"seed"``). Quality is PSNR (and SSIM) against the pipeline's own
images at its full setting. The settings sampled with every candidate are ``num_inference_steps``
and the sampler (the pipeline's own plus DPM-Solver++ 2M / Euler / UniPC; flow-matching models
keep their flow-matching Euler). The fewer-steps front (no technique) is always measured, so the
tuned result is never worse than it; diffusers' own caches (FirstBlockCache, TaylorSeer) are
searched beside mmskip's techniques where the denoiser supports them (``CacheMixin``). MagCache
is left out: it needs a calibration run per step count.

The techniques' spaces come from the configs' ``search_space`` declarations (``kind="denoiser"``);
this module only supplies the facts they read (step count, named target sets).
"""

from __future__ import annotations

import inspect
import json
import logging
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np
import torch

from mmskip.tuning.space import (
    Candidate,
    Choice,
    FloatRange,
    IntRange,
    Param,
    Space,
    TuneContext,
    combine,
    spaces_of,
)
from mmskip.tuning.target import TuneTarget, UnsupportedTargetError

from .sampler_names import ALTERNATIVE_SAMPLERS, is_flow, make_scheduler, plannable, sampler_name

__all__ = ["PipelineTarget", "is_pipeline", "target_sets", "deepcache_split"]

logger = logging.getLogger(__name__)

FRONT_FRACTIONS = (0.8, 0.6, 0.48, 0.4, 0.32, 0.28, 0.24, 0.2)  # the fewer-steps grid, as fractions of the baseline's steps
_OWNED_KWARGS = ("generator", "num_inference_steps", "output_type", "return_dict", "latents")
SEED_KEY = "seed"  # in a dict input: its seed (else one fixed by the input's content); not a call argument


def is_pipeline(obj: Any) -> bool:
    """A diffusers pipeline (what :class:`PipelineTarget` tunes)."""
    from diffusers import DiffusionPipeline

    return isinstance(obj, DiffusionPipeline)


def deepcache_split(unet: Any) -> tuple[str, ...]:
    """DeepCache's branch-0 split of a UNet as inheritance targets: everything but ``conv_in``'s
    branch and the last up block's last layers (which recompute every step)."""
    up = len(unet.up_blocks) - 1
    last = unet.up_blocks[up]
    shallow = tuple(f"down_blocks.{i}" for i in range(len(unet.down_blocks)))
    shallow += ("mid_block",) if unet.mid_block is not None else ()
    shallow += tuple(f"up_blocks.{i}" for i in range(up))
    shallow += tuple(f"up_blocks.{up}.resnets.{j}" for j in range(len(last.resnets) - 1))
    shallow += tuple(f"up_blocks.{up}.attentions.{j}" for j in range(len(getattr(last, "attentions", None) or []) - 1))
    return shallow


def target_sets(adapter: Any) -> dict[str, tuple[str, ...] | None]:
    """Named feature-inheritance target sets: ``default`` (the adapter's deep region); transformers:
    ``deep`` (every main block but the first) and ``all``; UNets: ``deepcache`` (DeepCache's
    branch-0 split: only ``conv_in``'s branch and the last up block's last layers recompute)."""
    sets: dict[str, tuple[str, ...] | None] = {"default": None}
    model = adapter.model
    if adapter.is_unet:
        sets["deepcache"] = deepcache_split(model)
        return sets
    stacks = adapter.default_stacks or adapter.stacks
    sizes = {s: len(model.get_submodule(s)) for s in stacks}
    first = stacks[0]
    if sizes[first] > 1:
        sets["deep"] = (f"{first}.1:{sizes[first]}",) + tuple(f"{s}.0:{sizes[s]}" for s in stacks[1:])
    sets["all"] = tuple(f"{s}.0:{sizes[s]}" for s in stacks)
    return sets


def _skip_class(pipe: Any) -> type | None:
    """The ``mmskip.pipelines`` drop-in class of ``pipe`` (its own class when it is one)."""
    import mmskip.pipelines as mp

    if isinstance(pipe, mp.SkipPipelineMixin):
        return type(pipe)
    for name in mp.__all__:
        cls = getattr(mp, name)
        if isinstance(cls, type) and issubclass(cls, mp.SkipPipelineMixin) and cls is not mp.SkipPipelineMixin:
            parent = next((b for b in cls.__mro__ if b.__module__.startswith("diffusers.")), None)
            if parent is type(pipe):
                return cls
    return None


def _content_seed(x: Any) -> int:
    """A seed fixed by an input's content (tensors by their bytes)."""
    def enc(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return f"tensor:{tuple(v.shape)}:{zlib.crc32(v.detach().cpu().contiguous().numpy().tobytes())}"
        if isinstance(v, dict):
            return {str(k): enc(w) for k, w in sorted(v.items(), key=lambda kv: str(kv[0]))}
        if isinstance(v, (list, tuple)):
            return [enc(w) for w in v]
        return v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)
    return zlib.crc32(json.dumps(enc(x), sort_keys=True).encode())


def _to_images(out: Any) -> torch.Tensor:
    """A pipeline's images as a float (N, C, H, W) tensor in [0, 1] on the CPU (video frames stacked)."""
    images = out.images if hasattr(out, "images") else (out.frames if hasattr(out, "frames") else out[0])
    if isinstance(images, list) and images and not isinstance(images[0], (torch.Tensor, np.ndarray)):
        images = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])  # PIL
    if isinstance(images, list):
        images = torch.stack([torch.as_tensor(np.asarray(i)) if not isinstance(i, torch.Tensor) else i for i in images])
    t = torch.as_tensor(images).detach().cpu().float()
    if t.dim() == 5:  # video: (N, F, C, H, W) or (N, F, H, W, C)
        t = t.flatten(0, 1)
    if t.dim() == 3:
        t = t.unsqueeze(0)
    if t.dim() == 4 and t.shape[-1] in (1, 3, 4) and t.shape[1] not in (1, 3, 4):  # NHWC (numpy output)
        t = t.permute(0, 3, 1, 2)
    return t.clamp(0, 1)


class PipelineTarget(TuneTarget):
    """A diffusers pipeline as ``mmskip.tune`` sees it.

    Args (``mmskip.tune(pipe, inputs, **options)`` passes them):
        pipe: an ``mmskip.pipelines`` drop-in, or a plain diffusers pipeline that has one (tuned
            through the drop-in class with the same modules; the user's object is not changed).
        steps: the baseline's ``num_inference_steps`` (default: the pipeline's own default).
        guidance_scale, height, width: passed to every call when given.
        seed: added to each input's content seed.
        gaussian_stats: a Gaussian stats file of the model's data: makes the analytic teleport tunable.
        call_kwargs: further arguments of every call (e.g. ``max_sequence_length``).
        samplers: the samplers to try (default: the pipeline's own plus :data:`ALTERNATIVE_SAMPLERS`
            where the model allows; flow-matching models only their own).
    """

    kind = "pipeline"
    metric = "psnr"
    default_floor = 30.0

    def __init__(self, pipe: Any, steps: int | None = None, guidance_scale: float | None = None,
                 height: int | None = None, width: int | None = None, seed: int = 0,
                 gaussian_stats: str | None = None, call_kwargs: dict[str, Any] | None = None,
                 samplers: Sequence[str] | None = None) -> None:
        super().__init__(pipe)
        cls = _skip_class(pipe)
        if cls is None:
            import mmskip.pipelines as mp

            raise UnsupportedTargetError(
                f"mmskip.tune has no drop-in for {type(pipe).__name__}; supported pipelines: "
                f"{', '.join(n.removeprefix('Skip') for n in mp.__all__ if n.startswith('Skip') and n != 'SkipPipelineMixin')}")
        self.pipe = pipe if isinstance(pipe, cls) else cls(**pipe.components)
        self.params = inspect.signature(type(self.pipe).__call__).parameters
        default_steps = self.params["num_inference_steps"].default if "num_inference_steps" in self.params else None
        self.steps = int(steps if steps is not None else default_steps or 25)
        if self.steps < 2:
            raise ValueError(f"steps must be >= 2 (the baseline's num_inference_steps), got {self.steps}")
        self.denoiser = getattr(self.pipe, type(self.pipe)._mmskip_denoiser)
        if getattr(self.denoiser, "is_cache_enabled", False):
            raise ValueError(f"the {type(self.denoiser).__name__} has a diffusers cache enabled; call disable_cache() "
                             "before tuning (the baseline must be the full model)")
        self.options = {k: v for k, v in (("guidance_scale", guidance_scale), ("height", height), ("width", width))
                        if v is not None}
        bad = sorted(set(call_kwargs or {}) & set(_OWNED_KWARGS))
        if bad:
            raise ValueError(f"call_kwargs may not set {bad}: the tuner sets them")
        self.options.update(call_kwargs or {})
        self.seed, self.gaussian_stats = seed, gaussian_stats
        self.own = sampler_name(self.pipe.scheduler)
        if samplers is None:
            samplers = () if is_flow(self.pipe.scheduler) else ALTERNATIVE_SAMPLERS
        elif isinstance(samplers, str) or not samplers:
            raise ValueError(f"samplers must be a non-empty list of sampler names, got {samplers!r}")
        for name in samplers:
            make_scheduler(self.pipe.scheduler, name)  # an unknown or unfit sampler fails here
        self.samplers = tuple(dict.fromkeys((self.own, *samplers)))
        self._active: Candidate | None = None

    # -- what the tuner searches ---------------------------------------------------------------
    def context(self) -> TuneContext:
        from mmskip.registry import UnsupportedModelError, get_adapter

        facts: dict[str, Any] = {}
        try:
            facts["target_sets"] = target_sets(get_adapter(self.denoiser, "diffusion"))
        except (UnsupportedModelError, AttributeError, TypeError) as e:
            logger.info("no named target sets for %s: %s", type(self.denoiser).__name__, e)
        if self.gaussian_stats:
            facts["gaussian_stats"] = str(self.gaussian_stats)
        facts["sampler"] = self.own
        facts["plannable_samplers"] = tuple(s for s in self.samplers if plannable(self.pipe.scheduler, s))
        return TuneContext(self.denoiser, "denoiser", num_steps=self.steps, facts=facts)

    def spaces(self) -> list[Space]:
        """Every declared technique alone, each model-level technique together with each sampler-level
        one (what ``enable_skip([...])`` accepts: e.g. inheritance plus the Gaussian jump), and the peers."""
        from mmskip.inject import SkipConfig

        from .plan import SamplerConfig

        context, classes = self.context(), SkipConfig.registered()
        models = spaces_of([c for c in classes if not issubclass(c, SamplerConfig)], context)
        samplers = spaces_of([c for c in classes if issubclass(c, SamplerConfig)], context)
        pairs = [combine(m, s) for m in models for s in samplers]
        return models + samplers + pairs + self._peer_spaces()

    def _peer_spaces(self) -> list[Space]:
        """diffusers' caches, where the denoiser is a ``CacheMixin`` (their builds return settings)."""
        from diffusers.models.cache_utils import CacheMixin

        if not isinstance(self.denoiser, CacheMixin):
            return []

        def fbc(v: dict[str, Any]) -> dict[str, Any]:
            return {"cache": "FirstBlockCache", "threshold": round(v["threshold"], 4)}

        def taylor(v: dict[str, Any]) -> dict[str, Any]:
            n = int(v.get("num_inference_steps") or self.steps)
            if v["warmup"] + v["cache_interval"] > n:
                raise ValueError(f"TaylorSeer warm-up {v['warmup']} + interval {v['cache_interval']} exceed {n} steps")
            return {"cache": "TaylorSeerCache", "cache_interval": v["cache_interval"],
                    "disable_cache_before_step": v["warmup"], "max_order": v["max_order"]}

        full = {"num_inference_steps": self.steps, "sampler": self.own}  # seeds: their defaults, as users run them
        return [Space("diffusers-fbc", {"threshold": FloatRange(0.01, 0.4, log=True)}, fbc,
                      family="diffusers-FirstBlockCache", seeds=({"threshold": 0.05, **full},)),
                Space("diffusers-taylorseer", {"cache_interval": IntRange(2, 6), "warmup": IntRange(1, 4),
                                               "max_order": IntRange(1, 2)}, taylor, family="diffusers-TaylorSeerCache",
                      seeds=({"cache_interval": 5, "warmup": 3, "max_order": 1, **full},))]

    def settings_space(self) -> dict[str, Param]:
        low = max(2, round(0.2 * self.steps))
        return {"num_inference_steps": IntRange(min(low, self.steps), self.steps), "sampler": Choice(self.samplers)}

    def baseline(self) -> Candidate:
        return Candidate(settings={"num_inference_steps": self.steps, "sampler": self.own}, family="baseline",
                         label=f"baseline {self.own}-{self.steps}")

    def fixed_candidates(self) -> list[Candidate]:
        grid = sorted({max(2, round(f * self.steps)) for f in FRONT_FRACTIONS} - {self.steps}, reverse=True)
        out = []
        for s in self.samplers:
            for n in grid:
                out.append(Candidate(settings={"num_inference_steps": n, "sampler": s}, family="fewer-steps",
                                     label=f"{s}-{n}"))
        return out

    def default_inputs(self, n: int, offset: int = 0) -> list[Any]:
        """Class-conditional pipelines: input ``i`` is class ``i`` mod the number of classes with seed ``i``
        (``offset .. offset + n``), so disjoint ranges are disjoint samples even where classes repeat."""
        if "class_labels" not in self.params:
            return super().default_inputs(n, offset)
        k = len(set((getattr(self.pipe, "labels", None) or {}).values())) or int(
            getattr(self.denoiser.config, "num_embeds_ada_norm", 0) or 0) or 10
        return [{"class_labels": [i % k], SEED_KEY: i} for i in range(offset, offset + n)]

    # -- inputs and runs -----------------------------------------------------------------------
    def check_inputs(self, inputs: Sequence[Any], name: str) -> list[Any]:
        kinds = ("prompts (str)" if "prompt" in self.params else "") + (
            "class labels (int)" if "class_labels" in self.params else "")
        what = f"a list of {kinds or 'inputs'} or dicts of {type(self.pipe).__name__} call arguments"
        if isinstance(inputs, (str, bytes, dict, int, torch.Tensor)) or not isinstance(inputs, Sequence):
            raise TypeError(f"{name} must be {what}, got {type(inputs).__name__}")
        if not inputs:
            raise ValueError(f"{name} is empty; give at least one input ({what})")
        out = []
        for i, x in enumerate(inputs):
            if isinstance(x, str) and "prompt" not in self.params:
                if "class_labels" in self.params and getattr(self.pipe, "labels", None):
                    try:
                        x = int(self.pipe.get_label_ids([x])[0])
                    except ValueError as e:
                        raise ValueError(f"{name}[{i}]: {e}") from None
                else:
                    raise TypeError(f"{name}[{i}] is text, but {type(self.pipe).__name__} takes no prompt; give {what}")
            elif isinstance(x, int) and not isinstance(x, bool) and "class_labels" not in self.params:
                raise TypeError(f"{name}[{i}] is a class label, but {type(self.pipe).__name__} takes none; give {what}")
            elif isinstance(x, dict):
                takes_any = any(p.kind is p.VAR_KEYWORD for p in self.params.values())
                unknown = sorted(k for k in x if k not in self.params and k != SEED_KEY and not takes_any)
                if SEED_KEY in x and (not isinstance(x[SEED_KEY], int) or isinstance(x[SEED_KEY], bool)):
                    raise TypeError(f"{name}[{i}]['seed'] must be an int, got {x[SEED_KEY]!r}")
                owned = sorted(k for k in x if k in _OWNED_KWARGS)
                if unknown or owned or not x:
                    raise ValueError(f"{name}[{i}]: " + (f"{type(self.pipe).__name__} takes no {unknown}" if unknown
                                     else f"{owned} are set by the tuner" if owned else "an empty dict"))
            elif not isinstance(x, (str, int)) or isinstance(x, bool):
                raise TypeError(f"{name}[{i}] is a {type(x).__name__}; give {what}")
            out.append(x)
        return out

    def _call_kwargs(self, x: Any, steps: int) -> dict[str, Any]:
        kw = {**self.options, "num_inference_steps": steps, "output_type": "pt"}
        if isinstance(x, str):
            kw["prompt"] = x
        elif isinstance(x, int):
            kw["class_labels"] = [x]
        else:
            kw.update({k: v for k, v in x.items() if k != SEED_KEY})
        return kw

    def _generate(self, inputs: list[Any], steps: int, cached: bool) -> torch.Tensor:
        """One call per input, seeded by its content (diffusers' cache state reset before each)."""
        from diffusers.hooks import HookRegistry

        bar = getattr(self.pipe, "_progress_bar_config", None)
        self.pipe.set_progress_bar_config(disable=True)
        images = []
        try:
            for x in inputs:
                if cached:
                    HookRegistry.check_if_exists_or_initialize(self.denoiser).reset_stateful_hooks()
                own = x.get(SEED_KEY) if isinstance(x, dict) else None
                g = torch.Generator().manual_seed(self.seed + (own if own is not None else _content_seed(x)))
                with torch.no_grad():
                    images.append(_to_images(self.pipe(**self._call_kwargs(x, steps), generator=g)))
        finally:
            if bar is None:
                self.pipe.__dict__.pop("_progress_bar_config", None)
            else:
                self.pipe._progress_bar_config = bar
        return torch.cat(images)

    def run(self, inputs: list[Any]) -> torch.Tensor:
        c = self._active
        steps = int(c.settings.get("num_inference_steps", self.steps)) if c is not None else self.steps
        return self._generate(inputs, steps, c is not None and "cache" in c.settings)

    def quality(self, outputs: Any, reference: Any) -> dict[str, float]:
        from mmskip.eval.fidelity import psnr, ssim

        if outputs.shape != reference.shape:
            raise ValueError(f"images of shape {tuple(outputs.shape)} cannot be compared with {tuple(reference.shape)}")
        out = {"psnr": psnr(outputs, reference)}  # capped at 100 dB: identical images stay finite
        if min(outputs.shape[-2:]) >= 11:  # SSIM's 11x11 window
            out["ssim"] = ssim(outputs, reference)
        return out

    # -- applying candidates -------------------------------------------------------------------
    def _cache_config(self, settings: dict[str, Any]) -> Any:
        name = settings.get("cache")
        if name is None:
            return None
        import diffusers

        if name == "FirstBlockCache":
            return diffusers.FirstBlockCacheConfig(threshold=float(settings["threshold"]))
        if name == "TaylorSeerCache":
            return diffusers.TaylorSeerCacheConfig(
                cache_interval=int(settings["cache_interval"]),
                disable_cache_before_step=int(settings["disable_cache_before_step"]),
                max_order=int(settings["max_order"]), taylor_factors_dtype=self.denoiser.dtype)
        raise ValueError(f"unknown diffusers cache {name!r}")

    @contextmanager
    def applied(self, candidate: Candidate) -> Iterator[None]:
        """The sampler, the configs (``enable_skip``) or the diffusers cache of ``candidate``; on exit
        the pipeline's own scheduler object, enabled configs and cache state come back."""
        pipe, cache = self.pipe, self._cache_config(candidate.settings)
        before_sched, before_configs = pipe.scheduler, pipe.skip_configs
        sched = make_scheduler(before_sched, candidate.settings.get("sampler", self.own))
        cached = False
        try:
            pipe.disable_skip()
            pipe.scheduler = sched
            if candidate.configs:
                pipe.enable_skip(list(candidate.configs))
            if cache is not None:
                self.denoiser.enable_cache(cache)
                cached = True
            self._active = candidate
            yield
        finally:
            self._active = None
            if cached:
                self.denoiser.disable_cache()
            pipe.scheduler = before_sched
            if before_configs:
                pipe.enable_skip(list(before_configs))
            else:
                pipe.disable_skip()

    @contextmanager
    def timing_pair(self, candidate: Candidate, inputs: list[Any]
                    ) -> Iterator[tuple[Callable[[], Any], Callable[[], Any]]]:
        """Baseline and candidate on the same pipeline, each applied (untimed) around its own timed call."""
        from mmskip.timing import Candidate as Timed

        def timed(c: Candidate) -> Timed:
            stacks: list[ExitStack] = []

            def setup() -> None:
                stack = ExitStack()
                stack.enter_context(self.applied(c))
                stacks.append(stack)

            return Timed(call=lambda: self.run(inputs), setup=setup, teardown=lambda: stacks.pop().close())

        yield timed(self.baseline()), timed(candidate)

    def settings_kwargs(self, candidate: Candidate) -> dict[str, Any]:
        return {"num_inference_steps": int(candidate.settings.get("num_inference_steps", self.steps))}

    def apply(self, candidate: Candidate) -> dict[str, Any]:
        """Set the sampler and enable the configs (or the diffusers cache) on the user's pipeline for
        good; returns the call arguments to pass (``num_inference_steps``)."""
        from mmskip.pipelines import SkipPipelineMixin

        pipe = self.model
        sched = make_scheduler(pipe.scheduler, candidate.settings.get("sampler", self.own))
        cache = self._cache_config(candidate.settings)
        skip = isinstance(pipe, SkipPipelineMixin)
        if candidate.configs and not skip:
            raise TypeError(f"the tuned configs need the drop-in pipeline: pipe = {type(self.pipe).__name__}"
                            f"(**pipe.components), then result.apply(pipe)")
        if candidate.configs:
            pipe.enable_skip(list(candidate.configs))  # validates first: nothing changes if it raises
        elif skip:
            pipe.disable_skip()
        pipe.scheduler = sched
        if cache is not None:
            self.denoiser.enable_cache(cache)
        return self.settings_kwargs(candidate)
