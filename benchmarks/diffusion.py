"""Diffusion acceleration benchmark: mmskip vs DeepCache, diffusers' caches, cache-dit and fewer steps.

On the zoo's ``digits-dit`` (DiTPipeline) and ``digits-sd`` (StableDiffusionPipeline), DDIM-50,
classifier-free guidance 4, CPU. Every method generates the same labels with the same seeds;
for each we report

* speedup: median over ``--repeats`` pairs of (baseline seconds / method seconds), each pair
  timed back to back on the same ``--time-batch`` images, so the drift of a shared machine
  cancels (warm-up call first);
* bound: 1 / (FLOPs spent / baseline FLOPs), whole pipeline (text encoder, VAE included),
  counted with ``torch.utils.flop_counter`` on a 2-image run;
* PSNR / SSIM of the images vs the baseline's images (fidelity);
* FID vs the held-out digits (zoo classifier features), CLIP score (zoo CLIP), conditional
  accuracy (zoo classifier).

Writes ``benchmarks/results/diffusion.json`` and ``benchmarks/results/diffusion_pareto.png``.
``--smoke`` runs every code path on tiny random pipelines in seconds (numbers meaningless; 4
images, 4 steps, one timing pair; results and stats go beside ``--out``).

    python benchmarks/diffusion.py                 # both zoo pipelines
    python benchmarks/diffusion.py --models digits-dit --n 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Method:
    name: str
    family: str  # baseline | fewer-steps | mmskip | deepcache | diffusers-fbc | diffusers-taylorseer | cache-dit
    setup: Callable[[Any], Callable[[], None] | None]  # returns a teardown
    steps: int | None = None
    note: str = ""
    seed_offset: int = 0


# -- pipelines -------------------------------------------------------------------------------------


def load_pipe(name: str, smoke: bool) -> Any:
    """The zoo pipeline as its mmskip drop-in class (same module objects); ``smoke``: random init."""
    from mmskip.pipelines import SkipDiTPipeline, SkipStableDiffusionPipeline

    if smoke:
        from mmskip.diffusion.testing import tiny_pipeline_components

        comps, _ = tiny_pipeline_components("dit" if "dit" in name else "sd")
        if "dit" in name:
            return SkipDiTPipeline(**comps)
        import tempfile

        from mmskip.diffusion.testing import tiny_unet

        from mmskip.zoo.sd_tokenizer import build_clip_tokenizer
        from mmskip.zoo.train_sd import make_text_encoder

        tok = build_clip_tokenizer(Path(tempfile.mkdtemp()))
        text_encoder = make_text_encoder(len(tok), tok.bos_token_id, tok.eos_token_id).eval()
        comps.update(unet=tiny_unet(cross_attention_dim=text_encoder.config.hidden_size), tokenizer=tok,
                     text_encoder=text_encoder)
        return SkipStableDiffusionPipeline(**comps)
    from mmskip import zoo

    pipe = zoo.load(name)
    if "dit" in name:
        return SkipDiTPipeline(**pipe.components)
    return SkipStableDiffusionPipeline(**pipe.components)


def is_dit(pipe: Any) -> bool:
    return hasattr(pipe, "transformer") and not hasattr(pipe, "tokenizer")


def denoiser(pipe: Any) -> torch.nn.Module:
    return pipe.transformer if is_dit(pipe) else pipe.unet


@torch.no_grad()
def generate(pipe: Any, labels: list[int], steps: int, guidance: float, seed: int, batch: int,
             before: Callable[[], None] | None = None) -> torch.Tensor:
    from mmskip.zoo.data import caption

    pipe.set_progress_bar_config(disable=True)
    out = []
    for b, i in enumerate(range(0, len(labels), batch)):
        g = torch.Generator().manual_seed(seed + b)
        if before is not None:
            before()
        chunk = labels[i : i + batch]
        if is_dit(pipe):
            res = pipe(class_labels=chunk, num_inference_steps=steps, guidance_scale=guidance, generator=g,
                       output_type="np")
            imgs = torch.as_tensor(res.images).permute(0, 3, 1, 2)
        else:
            res = pipe(prompt=[caption(c) for c in chunk], num_inference_steps=steps, guidance_scale=guidance,
                       generator=g, output_type="pt")
            imgs = res.images
        out.append(imgs.float().cpu())
    return torch.cat(out)


# -- methods -----------------------------------------------------------------------------------------


def _mmskip(configs: list[Any]) -> Callable[[Any], Callable[[], None]]:
    def setup(pipe: Any) -> Callable[[], None]:
        # FLOPs are counted for the whole pipeline below; skip the per-handle count in timed runs
        pipe.enable_skip([_no_count(c) for c in configs])
        return pipe.disable_skip

    return setup


def _no_count(config: Any) -> Any:
    import dataclasses

    from mmskip.diffusion import FeatureInheritanceConfig

    if isinstance(config, FeatureInheritanceConfig):
        return dataclasses.replace(config, measure_flops=False)
    return config


def _reset_hooks(model: torch.nn.Module) -> Callable[[], None]:
    from diffusers.hooks import HookRegistry

    def reset() -> None:
        HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks()

    return reset


def _with_cache_context(model: torch.nn.Module) -> Callable[[], None]:
    """DiT/UNet pipelines do not open diffusers' cache_context; open one around every denoiser call."""
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    def pre(mod: Any, args: Any) -> None:
        _set_cache_context(mod, CacheContext("cond"))

    h = model.register_forward_pre_hook(pre)
    return h.remove


def _diffusers_cache(kind: str, **params: Any) -> Callable[[Any], Callable[[], None]]:
    def setup(pipe: Any) -> Callable[[], None]:
        from diffusers.hooks import (
            FirstBlockCacheConfig,
            HookRegistry,
            TaylorSeerCacheConfig,
            apply_first_block_cache,
            apply_taylorseer_cache,
        )

        model = denoiser(pipe)
        if kind == "fbc":
            apply_first_block_cache(model, FirstBlockCacheConfig(**params))
            names = ("fbc_leader_block_hook", "fbc_block_hook")
        else:
            apply_taylorseer_cache(model, TaylorSeerCacheConfig(**params))
            names = ("taylorseer_cache",)
        reg = HookRegistry.check_if_exists_or_initialize(model)
        reg.invalidate_child_registries_cache()
        undo_ctx = _with_cache_context(model)
        pipe.__dict__["_bench_before"] = _reset_hooks(model)

        def teardown() -> None:
            undo_ctx()
            for n in names:
                reg.remove_hook(n, recurse=True)
            reg.invalidate_child_registries_cache()
            pipe.__dict__.pop("_bench_before", None)

        return teardown

    return setup


def _deepcache(interval: int, branch: int = 0) -> Callable[[Any], Callable[[], None]]:
    def setup(pipe: Any) -> Callable[[], None]:
        from DeepCache import DeepCacheSDHelper

        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=branch)
        helper.enable()

        def before() -> None:  # a new generation starts at step 0
            helper.start_timestep = None
            helper.cached_output = {}

        pipe.__dict__["_bench_before"] = before

        def teardown() -> None:
            helper.disable()
            pipe.__dict__.pop("_bench_before", None)

        return teardown

    return setup


def _cache_dit(threshold: float, taylorseer: bool = False) -> Callable[[Any], Callable[[], None]]:
    def setup(pipe: Any) -> Callable[[], None]:
        import cache_dit
        from diffusers import DiTPipeline

        parent = DiTPipeline(**pipe.components)  # cache-dit refuses subclasses it does not know
        # the default Fn_compute_blocks=8 exceeds the 6-block zoo DiT: F1B0 (first block as probe)
        cfg = cache_dit.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold)
        cal = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1) if taylorseer else None
        cache_dit.enable_cache(parent, cache_config=cfg, calibrator_config=cal)
        pipe.__dict__["_bench_pipe"] = parent

        def teardown() -> None:
            cache_dit.disable_cache(parent)
            pipe.__dict__.pop("_bench_pipe", None)

        return teardown

    return setup


def _calibrated(targets: tuple[str, ...] | None, num_compute: int, steps: int, guidance: float) -> Callable[[Any], Callable[[], None]]:
    """Measure the probe's per-step change on 20 images once, then recompute where it is largest."""

    def setup(pipe: Any) -> Callable[[], None]:
        from mmskip.diffusion import FeatureInheritanceConfig, from_changes

        from mmskip.schedules import adaptive

        pipe.enable_skip(FeatureInheritanceConfig(adaptive(0.0, "relative_change"), targets=targets))
        generate(pipe, [i % 10 for i in range(20)], steps, guidance, 777, 20)
        changes = pipe.skip_stats()["probe_changes"]
        pipe.enable_skip(FeatureInheritanceConfig(from_changes(changes, num_compute), targets=targets))
        return pipe.disable_skip

    return setup


TAYLOR_DIT = [r"^transformer_blocks\.\d+\.attn1$", r"^transformer_blocks\.\d+\.ff$"]


def methods_for(pipe: Any, steps: int, stats_path: str, guidance: float = 4.0) -> list[Method]:
    from mmskip.diffusion import FeatureInheritanceConfig as FI
    from mmskip.diffusion import GaussianTeleportConfig, StepSkipConfig, nonuniform

    from mmskip.schedules import adaptive, interval

    none: Callable[[Any], None] = lambda pipe: None  # noqa: E731
    ms: list[Method] = [
        Method("baseline DDIM-50", "baseline", none),
        Method("baseline DDIM-50, other seeds", "noise-floor", none, seed_offset=1000,
               note="the baseline on different seeds: FID/accuracy/CLIP sampling noise"),
    ]
    for s in (25, 17, 12):
        ms.append(Method(f"DDIM-{s}", "fewer-steps", none, steps=s))
    tele = lambda f: GaussianTeleportConfig(stats_path=stats_path, skip_fraction=f)  # noqa: E731
    if is_dit(pipe):
        n = len(pipe.transformer.transformer_blocks)
        deep = (f"transformer_blocks.1:{n}",)
        for k in (2, 3, 4):
            ms.append(Method(f"mmskip FI blocks 1:{n} every {k}", "mmskip", _mmskip([FI(interval(k), targets=deep)])))
        ms.append(Method(f"mmskip FI blocks 1:{n - 1} every 3", "mmskip", _mmskip([FI(interval(3))])))
        for c in (round(0.4 * steps), round(0.28 * steps)):
            ms.append(Method(f"mmskip FI blocks 1:{n} nonuniform {c}/{steps}", "mmskip",
                             _mmskip([FI(nonuniform(steps, c, power=1.5), targets=deep)])))
        for th in (0.1, 0.2, 0.3):
            ms.append(Method(f"mmskip FI blocks 1:{n} adaptive {th}", "mmskip",
                             _mmskip([FI(adaptive(th, "relative_change", warmup=2), targets=deep)])))
        for c in (round(0.34 * steps), round(0.28 * steps)):
            ms.append(Method(f"mmskip FI blocks 1:{n} calibrated {c}/{steps}", "mmskip",
                             _calibrated(deep, c, steps, guidance)))
        ms.append(Method(f"mmskip FI blocks 0:{n} every 2", "mmskip",
                         _mmskip([FI(interval(2), targets=(f"transformer_blocks.0:{n}",))])))
        ms.append(Method("mmskip FI unit every 3", "mmskip", _mmskip([FI(interval(3), granularity="unit")])))
        ms.append(Method("mmskip FI layer every 3", "mmskip", _mmskip([FI(interval(3), granularity="layer")])))
        ms.append(Method("mmskip step-skip every 2", "mmskip", _mmskip([StepSkipConfig(interval(2))])))
        ms.append(Method(f"DDIM-25 + mmskip FI 1:{n} every 2", "mmskip", _mmskip([FI(interval(2), targets=deep)]), steps=25))
        ms.append(Method(f"DDIM-17 + mmskip FI 1:{n} every 2", "mmskip", _mmskip([FI(interval(2), targets=deep)]), steps=17))
        ms.append(Method("DDIM-25 + mmskip teleport 20%", "mmskip", _mmskip([tele(0.2)]), steps=25))
        ms.append(Method("mmskip teleport 20%", "mmskip", _mmskip([tele(0.2)])))
        ms.append(Method(f"mmskip teleport 20% + FI 1:{n} every 2", "mmskip",
                         _mmskip([tele(0.2), FI(interval(2), targets=deep)])))
        ms.append(Method(f"mmskip teleport 20% + FI 1:{n} every 3", "mmskip",
                         _mmskip([tele(0.2), FI(interval(3), targets=deep)])))
        for th in (0.05, 0.1, 0.2):
            ms.append(Method(f"diffusers FirstBlockCache {th}", "diffusers-fbc", _diffusers_cache("fbc", threshold=th)))
        for k in (3, 5):
            ms.append(Method(f"diffusers TaylorSeerCache interval {k}", "diffusers-taylorseer",
                             _diffusers_cache("taylorseer", cache_interval=k, disable_cache_before_step=3,
                                              taylor_factors_dtype=torch.float32, cache_identifiers=TAYLOR_DIT),
                             note="default identifiers fullmatch '^transformer_blocks.*attn', which misses DiT's "
                                  "attn1; we pass attn1 and ff"))
        for th in (0.08, 0.16):
            ms.append(Method(f"cache-dit DBCache F1B0 {th}", "cache-dit", _cache_dit(th)))
        ms.append(Method("cache-dit DBCache F1B0 0.16 + TaylorSeer", "cache-dit", _cache_dit(0.16, True)))
    else:
        # (a shorter list than the DiT's: the UNet costs ~3x more per step on this CPU)
        for k in (2, 3):
            ms.append(Method(f"mmskip FI blocks every {k}", "mmskip", _mmskip([FI(interval(k))])))
        c = round(0.28 * steps)
        ms.append(Method(f"mmskip FI blocks nonuniform {c}/{steps}", "mmskip",
                         _mmskip([FI(nonuniform(steps, c, power=1.5))])))
        ms.append(Method("mmskip FI blocks adaptive 0.1", "mmskip",
                         _mmskip([FI(adaptive(0.1, "relative_change", warmup=2))])))
        ms.append(Method(f"mmskip FI blocks calibrated {c}/{steps}", "mmskip", _calibrated(None, c, steps, guidance)))
        # DeepCache's branch-0 split: only conv_in and the last up block's last layer recompute
        up = len(pipe.unet.up_blocks) - 1
        last = pipe.unet.up_blocks[up]
        shallow = tuple(f"down_blocks.{i}" for i in range(len(pipe.unet.down_blocks))) + ("mid_block",)
        shallow += tuple(f"up_blocks.{i}" for i in range(up))
        shallow += tuple(f"up_blocks.{up}.resnets.{j}" for j in range(len(last.resnets) - 1))
        shallow += tuple(f"up_blocks.{up}.attentions.{j}" for j in range(len(getattr(last, "attentions", None) or []) - 1))
        for k in (3, 5):
            ms.append(Method(f"mmskip FI DeepCache-shape every {k}", "mmskip", _mmskip([FI(interval(k), targets=shallow)])))
        ms.append(Method(f"mmskip FI DeepCache-shape nonuniform {c}/{steps}", "mmskip",
                         _mmskip([FI(nonuniform(steps, c, power=1.5), targets=shallow)])))
        ms.append(Method("DDIM-25 + mmskip FI DeepCache-shape every 2", "mmskip",
                         _mmskip([FI(interval(2), targets=shallow)]), steps=25))
        ms.append(Method("mmskip teleport 20% + FI every 3", "mmskip", _mmskip([tele(0.2), FI(interval(3))])))
        for k in (3, 5):
            ms.append(Method(f"DeepCache interval {k}", "deepcache", _deepcache(k)))
        ms.append(Method("diffusers FirstBlockCache 0.1", "diffusers-fbc", _diffusers_cache("fbc", threshold=0.1)))
    return ms


# -- measuring ---------------------------------------------------------------------------------------


def gaussian_stats(pipe: Any, name: str, smoke: bool, folder: Path = RESULTS) -> str:
    """The latent Gaussian (mean + PCA) of the training digits, cached in ``folder`` (safetensors)."""
    from mmskip.diffusion import GaussianStats

    path = folder / f"diffusion_gaussian_{name}{'_smoke' if smoke else ''}.safetensors"

    def build() -> GaussianStats:
        if smoke:
            return GaussianStats.fit(torch.randn(64, 4, 8, 8), rank=16)
        from mmskip.zoo.data import load_split

        x = load_split("train")[0]
        if x.shape[1] != pipe.vae.config.in_channels:
            x = x.repeat(1, pipe.vae.config.in_channels, 1, 1)
        return GaussianStats.from_images(x, vae=pipe.vae, rank=64)

    GaussianStats.cached(path, build)
    return str(path)


def pipeline_flops(pipe: Any, steps: int, guidance: float, before: Callable[[], None] | None) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        generate(pipe, [0, 1], steps, guidance, 1234, 2, before)
    return float(fc.get_total_flops())


def method_steps(method: Method, args: argparse.Namespace) -> int:
    """The method's step count (``--smoke`` caps fewer-step methods at ``--steps``)."""
    steps = method.steps or args.steps
    return min(steps, args.steps) if args.smoke else steps


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from mmskip.eval import clip_score, conditional_accuracy, fid, psnr, ssim
    from mmskip.zoo.data import caption

    pipe = load_pipe(name, args.smoke)
    stats_path = gaussian_stats(pipe, name, args.smoke, args.out.parent if args.smoke else RESULTS)
    labels = [i % 10 for i in range(args.n)]
    captions = [caption(c) for c in labels]
    time_labels = labels[: args.time_batch]
    if args.smoke:
        real, clip = None, None
    else:
        from mmskip.eval.clip_score import load_clip
        from mmskip.eval.images import reference_images

        real = reference_images("test")
        try:
            clip = load_clip("digits-clip")
        except FileNotFoundError as err:  # the zoo CLIP is trained separately
            print(f"no CLIP score: {err}", flush=True)
            clip = None
    rows: list[dict[str, Any]] = []
    methods = methods_for(pipe, args.steps, stats_path, args.guidance)
    if args.only:
        methods = [m for m in methods if m.family == "baseline" or any(s in m.name for s in args.only)]
    base_imgs: torch.Tensor | None = None
    base_times: list[float] = []
    base_flops = 1.0

    def paired(method: Method, teardown: Callable[[], None] | None) -> tuple[list[float], list[float]]:
        """Alternate timed runs of the baseline and the method on the same images (drift cancels).

        Returns (baseline seconds, method seconds); the method is set up again after each
        baseline run and left set up.
        """
        steps = method_steps(method, args)
        tb, tm = [], []
        for r in range(args.repeats):
            if teardown is not None:
                teardown()
            t0 = time.perf_counter()
            generate(pipe, time_labels, args.steps, args.guidance, 100 + r, args.time_batch)
            tb.append(time.perf_counter() - t0)
            teardown = method.setup(pipe)
            runner = pipe.__dict__.get("_bench_pipe", pipe)
            before = pipe.__dict__.get("_bench_before")
            t0 = time.perf_counter()
            generate(runner, time_labels, steps, args.guidance, 100 + r, args.time_batch, before)
            tm.append(time.perf_counter() - t0)
        held["teardown"] = teardown
        return tb, tm

    held: dict[str, Any] = {}

    for method in methods:
        print(f"[{name}] {method.name} ...", flush=True)
        row: dict[str, Any] = {"method": method.name, "family": method.family, "steps": method_steps(method, args)}
        if method.note:
            row["note"] = method.note
        teardown = None
        try:
            teardown = method.setup(pipe)
            before = pipe.__dict__.get("_bench_before")
            runner = pipe.__dict__.get("_bench_pipe", pipe)
            steps = method_steps(method, args)
            if not args.smoke:
                generate(runner, labels[:2], steps, args.guidance, 99, 2, before)  # warm-up
            t0 = time.perf_counter()
            imgs = generate(runner, labels, steps, args.guidance, args.seed + method.seed_offset, args.batch, before)
            row["quality_run_s"] = time.perf_counter() - t0
            if pipe.skip_enabled:
                row["skip_stats"] = {k: v for k, v in pipe.skip_stats().items() if k != "items"}
            row["flops"] = pipeline_flops(runner, steps, args.guidance, before)
            if args.repeats and method.family != "baseline":
                row["paired_baseline_s"], row["paired_method_s"] = paired(method, teardown)
                teardown = held.pop("teardown")
        except Exception as err:  # a peer that does not apply to this model
            row["error"] = f"{type(err).__name__}: {err}"
            traceback.print_exc(limit=3)
            rows.append(row)
            continue
        finally:
            if teardown is not None:
                teardown()
        if method.family == "baseline":
            base_imgs, base_flops = imgs, row["flops"]
            base_times.append(row["quality_run_s"])
        assert base_imgs is not None
        row["psnr"] = psnr(imgs, base_imgs) if method.family != "baseline" else float("inf")
        row["ssim"] = ssim(imgs, base_imgs)
        row["flops_fraction"] = row["flops"] / base_flops
        row["bound"] = 1 / row["flops_fraction"]
        if real is not None:
            row["fid"] = fid(real, imgs)
            if clip is not None:
                row["clip_score"] = clip_score(imgs, captions, clip)
            row["accuracy"] = conditional_accuracy(imgs, labels)
        rows.append(row)
    # the baseline again at the end: drift of the machine's speed shows here
    print(f"[{name}] baseline (again) ...", flush=True)
    t0 = time.perf_counter()
    generate(pipe, labels, args.steps, args.guidance, args.seed, args.batch)
    base_times.append(time.perf_counter() - t0)
    for row in rows:
        if "paired_method_s" in row:
            ratios = [b / m for b, m in zip(row["paired_baseline_s"], row["paired_method_s"], strict=True)]
            row["speedup"] = statistics.median(ratios)
            row["speedup_spread"] = [min(ratios), max(ratios)]
        elif "quality_run_s" in row:
            row["speedup"] = statistics.median(base_times) / row["quality_run_s"]
        if row["family"] == "baseline":
            # by definition; how much the machine's speed drifted between its two timed runs:
            row["timing_drift"] = max(base_times) / min(base_times)
            row["speedup"] = 1.0
    return {"pipeline": type(pipe).__mro__[2].__name__, "baseline_times_s": base_times, "rows": rows}


def print_table(name: str, res: dict[str, Any]) -> str:
    head = f"{'method':42s} {'speedup':>7s} {'bound':>6s} {'PSNR':>6s} {'SSIM':>5s} {'FID':>7s} {'CLIP':>6s} {'acc':>5s}"
    lines = [f"## {name} ({res['pipeline']})", "", "```", head]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"{r['method']:42s} n/a: {r['error'][:70]}")
            continue
        def f(k: str, fmt: str, r: dict[str, Any] = r) -> str:
            return format(r[k], fmt) if k in r else "-"

        psnr_s = "inf" if r.get("psnr") == float("inf") else f("psnr", "6.2f")
        lines.append(f"{r['method']:42s} {f('speedup', '7.2f')} {f('bound', '6.2f')} {psnr_s:>6s} {f('ssim', '5.3f')} "
                     f"{f('fid', '7.2f')} {f('clip_score', '6.2f')} {f('accuracy', '5.3f')}")
    lines.append("```")
    text = "\n".join(lines)
    print(text)
    return text


def plot(results: dict[str, Any], path: Path) -> None:
    """Speedup vs FID (top) and vs PSNR to the baseline's images (bottom), one column per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    fig, axes = plt.subplots(2, len(models), figsize=(7 * len(models), 9), squeeze=False)
    colors = {"baseline": "black", "noise-floor": "lightgray", "fewer-steps": "tab:gray", "mmskip": "tab:red",
              "deepcache": "tab:blue", "diffusers-fbc": "tab:green", "diffusers-taylorseer": "tab:olive",
              "cache-dit": "tab:purple"}
    for col, name in enumerate(models):
        rows = [r for r in results["models"][name]["rows"] if "speedup" in r]
        for row_i, ykey in enumerate(("fid", "psnr")):
            ax = axes[row_i][col]
            if ykey == "fid" and not any("fid" in r for r in rows):
                ykey = "ssim"
            for fam, color in colors.items():
                pts = [(r["speedup"], r[ykey], r["method"]) for r in rows
                       if r["family"] == fam and ykey in r and r[ykey] != float("inf")]
                if not pts:
                    continue
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=color, label=fam, s=30)
                for x, y, label in pts:
                    ax.annotate(label.replace("mmskip ", "").replace("diffusers ", ""), (x, y), fontsize=5,
                                xytext=(3, 2), textcoords="offset points")
            if ykey == "fid":
                floor = [r["fid"] for r in rows if r["family"] in ("baseline", "noise-floor") and "fid" in r]
                if len(floor) == 2:
                    ax.axhspan(min(floor), max(floor), color="lightgray", alpha=0.4, label="baseline seed noise")
            ax.set_xlabel("speedup vs DDIM-50 (paired wall time, same run)")
            ax.set_ylabel({"fid": "FID vs held-out digits (lower is better)",
                           "psnr": "PSNR to the DDIM-50 images, dB (higher is better)",
                           "ssim": "SSIM"}[ykey])
            ax.set_title(f"{name}: speedup vs {ykey.upper()}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    print(f"wrote {path}")


def merge(parts: list[Path], out: Path) -> int:
    """One JSON, table and plot from per-model runs (each run keeps its own settings)."""
    results: dict[str, Any] = {"runs": {}, "models": {}}
    for p in parts:
        d = json.loads(p.read_text())
        for name, res in d["models"].items():
            for row in res["rows"]:
                if row["family"] == "baseline" and "timing_drift" not in row:
                    bt = res["baseline_times_s"]
                    row["timing_drift"], row["speedup"] = max(bt) / min(bt), 1.0
            results["models"][name] = res
            results["runs"][name] = {k: v for k, v in d.items() if k != "models"}
    out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    tables = []
    for name, res in results["models"].items():
        run = results["runs"][name]
        head = (f"torch.set_num_threads({run['torch_threads']}), CPU, {run['steps']} steps, n={run['n']} images, "
                f"CFG {run['guidance_scale']}")
        tables.append(head + "\n\n" + print_table(name, res))
    out.with_suffix(".md").write_text("\n\n".join(tables) + "\n")
    plot(results, out.with_name(out.stem + "_pareto.png"))
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["digits-dit", "digits-sd"])
    ap.add_argument("--n", type=int, default=200, help="images per method (quality metrics; its wall time is timed)")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3,
                    help="paired timings per method: baseline then method on --time-batch images, alternating")
    ap.add_argument("--time-batch", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="*", help="run only methods whose name contains one of these")
    ap.add_argument("--smoke", action="store_true", help="tiny random pipelines, every code path, seconds")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--merge", nargs="+", type=Path, help="combine earlier result JSONs (one per model) into --out")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out or RESULTS / "diffusion.json")
    torch.set_num_threads(args.threads)
    if args.smoke:  # every code path, as little work as possible
        args.n, args.steps, args.repeats = min(args.n, 2), min(args.steps, 3), min(args.repeats, 1)
        args.batch, args.time_batch = min(args.batch, 2), min(args.time_batch, 2)
    out = args.out or RESULTS / ("diffusion_smoke.json" if args.smoke else "diffusion.json")
    args.out = out
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "torch": torch.__version__,
        "n": args.n,
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "repeats": args.repeats,
        "time_batch": args.time_batch,
        "models": {},
    }
    print(f"torch.set_num_threads({torch.get_num_threads()}); CPU; {args.steps} steps; n={args.n}", flush=True)
    tables = []
    for name in args.models:
        results["models"][name] = run_model(name, args)
        out.write_text(json.dumps(results, indent=1, default=str) + "\n")
        tables.append(print_table(name, results["models"][name]))
    (out.with_suffix(".md")).write_text("\n\n".join(tables) + "\n")
    plot(results, out.with_name(out.stem + "_pareto.png"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
