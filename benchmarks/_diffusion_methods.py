"""The methods ``benchmarks/diffusion.py`` compares: the fewer-steps front, mmskip configurations, peers.

mmskip configurations are written as specs (``"steps=18 fi=interval:2 targets=deep"``) so that
``benchmarks/diffusion_search.py`` and the benchmark share one vocabulary:

* ``steps=N``: the sampler's step count (default: the headline's);
* ``fi=interval:K | nonuniform:C | adaptive:TH | calibrated:C``: feature inheritance schedule
  (``nonuniform``/``calibrated``: recompute C of the steps; ``adaptive``: relative change of the
  probe, two warm-up steps);
* ``targets=default | deep | all | single | deepcache`` (per model, see :func:`targets_for`);
* ``gran=block | layer | unit``;
* ``tele=F``: the analytic Gaussian jump over the first fraction F of the steps;
* ``skip=interval:K``: step skipping (the sampler takes one larger step).
"""

from __future__ import annotations

import ast
import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Setup = Callable[[Any], Callable[[], None] | None]  # (ZooModel) -> teardown


@dataclass
class Method:
    name: str
    family: str  # baseline | noise-floor | fewer-steps | mmskip | deepcache | diffusers-* | cache-dit
    setup: Setup
    steps: int | None = None
    note: str = ""
    seed_offset: int = 0


def _none(model: Any) -> None:
    return None


# -- mmskip specs ------------------------------------------------------------------------------------


def targets_for(model: Any, name: str) -> tuple[str, ...] | None:
    """Named target sets: ``default`` (the adapter's deep region), ``deep`` (all blocks but the first),
    ``all``, ``single`` (Flux's single-stream blocks), ``deepcache`` (UNet: DeepCache's branch-0 split)."""
    if name == "default":
        return None
    if model.kind == "dit":
        n = len(model.pipe.transformer.transformer_blocks)
        ranges = {"deep": (f"transformer_blocks.1:{n}",), "all": (f"transformer_blocks.0:{n}",)}
    elif model.kind == "flux":
        t = model.pipe.transformer
        d, s = len(t.transformer_blocks), len(t.single_transformer_blocks)
        ranges = {"deep": (f"transformer_blocks.1:{d}", f"single_transformer_blocks.0:{s}"),
                  "all": (f"transformer_blocks.0:{d}", f"single_transformer_blocks.0:{s}"),
                  "single": (f"single_transformer_blocks.0:{s}",)}
    else:
        ranges = {"deepcache": _deepcache_shape(model.pipe.unet)}
    if name not in ranges:
        raise ValueError(f"targets={name!r} is not defined for {model.name}; choose default or {sorted(ranges)}")
    return ranges[name]


def _deepcache_shape(unet: torch.nn.Module) -> tuple[str, ...]:
    """DeepCache's branch-0 split (the library's, which the tuner offers as a target set too)."""
    from mmskip.diffusion.tune_target import deepcache_split

    return deepcache_split(unet)


def parse_spec(spec: str) -> dict[str, str]:
    out = {}
    for tok in spec.split():
        key, sep, value = tok.partition("=")
        if not sep or key not in ("steps", "fi", "targets", "gran", "tele", "skip"):
            raise ValueError(f"bad mmskip spec token {tok!r} in {spec!r} (see benchmarks/_diffusion_methods.py)")
        out[key] = value
    return out


def spec_method(model: Any, spec: str, stats_path: str | None) -> Method:
    """The :class:`Method` a spec describes (family ``mmskip``)."""
    p = parse_spec(spec)
    steps = int(p.get("steps", model.steps))
    return Method(f"mmskip {spec}", "mmskip", lambda m: _spec_setup(m, p, steps, stats_path),
                  steps=steps if steps != model.steps else None)


def _spec_setup(model: Any, p: dict[str, str], steps: int, stats_path: str | None) -> Callable[[], None]:
    from mmskip.diffusion import FeatureInheritanceConfig as FI
    from mmskip.diffusion import GaussianTeleportConfig, StepSkipConfig, from_changes, nonuniform

    from mmskip.schedules import adaptive, interval

    configs: list[Any] = []
    if "tele" in p:
        if stats_path is None:
            raise ValueError("tele= needs the Gaussian statistics of the model's data")
        configs.append(GaussianTeleportConfig(stats_path=stats_path, skip_fraction=float(p["tele"])))
    if "skip" in p:
        configs.append(StepSkipConfig(interval(int(p["skip"].split(":")[1]))))
    if "fi" in p:
        kind, _, arg = p["fi"].partition(":")
        targets = targets_for(model, p.get("targets", "default"))
        gran = p.get("gran", "block")
        if gran != "block" and targets is not None:
            targets = None  # named target sets are block ranges; other granularities use their default region
        if kind == "interval":
            sched = interval(int(arg))
        elif kind == "nonuniform":
            sched = nonuniform(steps, min(int(arg), steps), power=1.5)
        elif kind == "adaptive":
            sched = adaptive(float(arg), "relative_change", warmup=2)
        elif kind == "calibrated":
            sched = from_changes(_probe_changes(model, targets, gran, steps), min(int(arg), steps))
        else:
            raise ValueError(f"unknown fi schedule {kind!r}")
        configs.append(FI(sched, granularity=gran, targets=targets, measure_flops=False))
    model.pipe.enable_skip(configs)
    return model.pipe.disable_skip


def _probe_changes(model: Any, targets: Any, gran: str, steps: int) -> list[float]:
    """The adaptive probe's per-step change on 16 calibration conditions (seeds apart from the measured ones)."""
    from mmskip.diffusion import FeatureInheritanceConfig as FI

    from mmskip.schedules import adaptive

    model.pipe.enable_skip(FI(adaptive(0.0, "relative_change"), granularity=gran, targets=targets))
    model.generate(model.pipe, 16, steps, 777, 16, offset=5000)
    changes = model.pipe.skip_stats()["probe_changes"]
    model.pipe.disable_skip()
    return changes


# -- peers -------------------------------------------------------------------------------------------


def _reset_hooks(module: torch.nn.Module) -> Callable[[], None]:
    from diffusers.hooks import HookRegistry

    def reset() -> None:
        HookRegistry.check_if_exists_or_initialize(module).reset_stateful_hooks()

    return reset


def _with_cache_context(module: torch.nn.Module) -> Callable[[], None]:
    """DiT/UNet pipelines do not open diffusers' cache_context (Flux's does); open one per denoiser call."""
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    def pre(mod: Any, args: Any) -> None:
        _set_cache_context(mod, CacheContext("cond"))

    return module.register_forward_pre_hook(pre).remove


def denoiser(model: Any) -> torch.nn.Module:
    return model.pipe.unet if model.kind == "sd" else model.pipe.transformer


def _diffusers_cache(kind: str, **params: Any) -> Setup:
    """diffusers' FirstBlockCache / TaylorSeerCache / MagCache on the denoiser (``magcache``: calibrated first)."""

    def setup(model: Any) -> Callable[[], None]:
        from diffusers import hooks

        module = denoiser(model)
        if model.kind == "sd":
            raise TypeError(f"diffusers' {kind} hooks look for transformer blocks; a UNet has none")
        if kind == "fbc":
            hooks.apply_first_block_cache(module, hooks.FirstBlockCacheConfig(**params))
            names = ("fbc_leader_block_hook", "fbc_block_hook")
        elif kind == "taylorseer":
            hooks.apply_taylorseer_cache(module, hooks.TaylorSeerCacheConfig(**params))
            names = ("taylorseer_cache",)
        else:
            ratios = _mag_ratios(model)
            hooks.apply_mag_cache(module, hooks.MagCacheConfig(num_inference_steps=model.steps, mag_ratios=ratios,
                                                               **params))
            names = ("mag_cache_leader_block_hook", "mag_cache_block_hook")
        reg = hooks.HookRegistry.check_if_exists_or_initialize(module)
        reg.invalidate_child_registries_cache()
        undo_ctx = _with_cache_context(module) if model.kind != "flux" else (lambda: None)
        model.pipe.__dict__["_bench_before"] = _reset_hooks(module)

        def teardown() -> None:
            undo_ctx()
            for n in names:
                reg.remove_hook(n, recurse=True)
            reg.invalidate_child_registries_cache()
            model.pipe.__dict__.pop("_bench_before", None)

        return teardown

    return setup


def _mag_ratios(model: Any) -> list[float]:
    """MagCache's calibration run (its documented procedure): one generation, the printed ratios."""
    from diffusers import hooks

    module = denoiser(model)
    hooks.apply_mag_cache(module, hooks.MagCacheConfig(num_inference_steps=model.steps, calibrate=True))
    undo_ctx = _with_cache_context(module) if model.kind != "flux" else (lambda: None)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            model.generate(model.pipe, 1, model.steps, 777, 1, offset=5000)
    finally:
        undo_ctx()
        reg = hooks.HookRegistry.check_if_exists_or_initialize(module)
        for n in ("mag_cache_leader_block_hook", "mag_cache_block_hook"):
            reg.remove_hook(n, recurse=True)
        reg.invalidate_child_registries_cache()
    lists = [line for line in buf.getvalue().splitlines() if line.startswith("[") and line.rstrip().endswith("]")]
    if not lists:
        raise RuntimeError("MagCache calibration printed no ratios")
    return ast.literal_eval(lists[0])


def _deepcache(interval: int, branch: int = 0) -> Setup:
    def setup(model: Any) -> Callable[[], None]:
        from DeepCache import DeepCacheSDHelper

        helper = DeepCacheSDHelper(pipe=model.pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=branch)
        helper.enable()

        def before() -> None:  # a new generation starts at step 0
            helper.start_timestep = None
            helper.cached_output = {}

        model.pipe.__dict__["_bench_before"] = before

        def teardown() -> None:
            helper.disable()
            model.pipe.__dict__.pop("_bench_before", None)

        return teardown

    return setup


def _cache_dit(threshold: float, taylorseer: bool = False) -> Setup:
    def setup(model: Any) -> Callable[[], None]:
        import cache_dit
        from diffusers import DiTPipeline, FluxPipeline

        # cache-dit refuses pipeline subclasses it does not know: hand it the diffusers parent class
        parent = (FluxPipeline if model.kind == "flux" else DiTPipeline)(**model.pipe.components)
        # the default Fn_compute_blocks=8 exceeds these 6-block models: F1B0 (first block as probe)
        cfg = cache_dit.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold)
        cal = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1) if taylorseer else None
        cache_dit.enable_cache(parent, cache_config=cfg, calibrator_config=cal)
        model.pipe.__dict__["_bench_pipe"] = parent

        def teardown() -> None:
            cache_dit.disable_cache(parent)
            model.pipe.__dict__.pop("_bench_pipe", None)

        return teardown

    return setup


TAYLOR_DIT = [r"^transformer_blocks\.\d+\.attn1$", r"^transformer_blocks\.\d+\.ff$"]


def peers_for(model: Any) -> list[Method]:
    ms: list[Method] = []
    if model.kind in ("dit", "flux"):
        for th in (0.05, 0.1, 0.2):
            ms.append(Method(f"diffusers FirstBlockCache {th}", "diffusers-fbc", _diffusers_cache("fbc", threshold=th)))
        extra = {"cache_identifiers": TAYLOR_DIT} if model.kind == "dit" else {}
        for k in (3, 5):
            ms.append(Method(f"diffusers TaylorSeerCache interval {k}", "diffusers-taylorseer",
                             _diffusers_cache("taylorseer", cache_interval=k, disable_cache_before_step=3,
                                              taylor_factors_dtype=torch.float32, **extra),
                             note="DiT: default identifiers fullmatch '^transformer_blocks.*attn', which misses "
                                  "DiT's attn1; we pass attn1 and ff" if model.kind == "dit" else ""))
        for th in (0.06, 0.12, 0.24):
            ms.append(Method(f"diffusers MagCache {th}", "diffusers-magcache", _diffusers_cache("magcache", threshold=th),
                             note="mag_ratios from its calibration run on one held-apart prompt"))
        for th in (0.08, 0.16):
            ms.append(Method(f"cache-dit DBCache F1B0 {th}", "cache-dit", _cache_dit(th)))
        ms.append(Method("cache-dit DBCache F1B0 0.16 + TaylorSeer", "cache-dit", _cache_dit(0.16, True)))
    else:
        for k in (3, 5):
            ms.append(Method(f"DeepCache interval {k}", "deepcache", _deepcache(k)))
        ms.append(Method("diffusers FirstBlockCache 0.1", "diffusers-fbc", _diffusers_cache("fbc", threshold=0.1)))
    return ms


# -- the lists -----------------------------------------------------------------------------------------


def sampler_label(model: Any) -> str:
    """How tables name the model's sampler (``DPM++2M``, ``DDIM``, ``Euler``)."""
    return {"dpm++2m": "DPM++2M", "ddim": "DDIM", "euler": "Euler"}[model.sampler]


def front_for(model: Any) -> list[Method]:
    label = sampler_label(model)
    return [Method(f"{label}-{s}", "fewer-steps", _none, steps=s) for s in model.steps_front]


SPECS = {
    "dit": [
        "fi=interval:2 targets=deep", "fi=interval:3 targets=deep", "fi=interval:4 targets=deep",
        "fi=nonuniform:9 targets=deep", "fi=adaptive:0.1 targets=deep", "fi=adaptive:0.2 targets=deep",
        "fi=calibrated:9 targets=deep", "fi=interval:3 gran=unit", "fi=interval:3 gran=layer",
        "skip=interval:2", "tele=0.2", "tele=0.2 fi=interval:2 targets=deep",
        "steps=15 fi=interval:2 targets=deep",
    ],
    "sd": [
        "fi=interval:2", "fi=interval:3", "fi=adaptive:0.1", "fi=interval:3 targets=deepcache",
        "fi=interval:5 targets=deepcache", "fi=nonuniform:9 targets=deepcache", "tele=0.2 fi=interval:3",
        "steps=15 fi=interval:2 targets=deepcache",
    ],
    "flux": [
        "fi=interval:2", "fi=interval:2 targets=deep", "fi=adaptive:0.1 targets=deep",
        "fi=calibrated:10 targets=deep", "fi=interval:2 gran=layer", "skip=interval:2",
    ],
}


def methods_for(model: Any, stats_path: str | None, extra_specs: list[str] | None = None) -> list[Method]:
    """Headline baseline, its seed-noise twin, the fewer-steps front, mmskip specs, then the peers."""
    label = sampler_label(model)
    ms = [
        Method(f"baseline {label}-{model.steps}", "baseline", _none),
        Method(f"baseline {label}-{model.steps}, other seeds", "noise-floor", _none, seed_offset=1000,
               note="the baseline on different seeds: FID/accuracy/CLIP sampling noise"),
        *front_for(model),
    ]
    specs = [s for s in SPECS[model.kind] if "tele=" not in s or stats_path is not None]
    for spec in specs + [s for s in (extra_specs or []) if s not in specs]:
        ms.append(spec_method(model, spec, stats_path))
    return ms + peers_for(model)
