"""Diffusion denoisers at real shapes on a GPU: mmskip's inheritance vs diffusers' / cache-dit's caches.

Speed only: random weights (no downloads, text encoders or VAE), a denoiser-level sampling loop.

* ``sd15``: SD 1.5's UNet (real config), fp16, 64x64 latents, batch 2 (CFG 7.5 batched as the
  pipeline does), DDIM, 50 steps.
* ``flux``: Flux-dev's width (24 heads x 128, T5 4096, guidance embedding), bf16, but
  ``--flux-layers`` 4 double + 8 single blocks; 1024x1024 = 4096 image + 512 text tokens, batch 1.
* ``wan``: Wan 2.1 1.3B's width (12 heads x 128, ffn 8960), bf16, but ``--wan-layers`` 8 blocks;
  latents (1, 16, ``--wan-frames`` 5, 60, 104) = 480x832x17 frames = 7800 tokens, 512 text tokens,
  batch 1, no CFG. Flux and Wan: flow-matching Euler, shift 3, 28 steps.

Methods: baseline; mmskip ``FeatureInheritanceConfig`` (block granularity, default targets) every
2 / 3 steps and adaptive; diffusers' FirstBlockCache, MagCache (ratios calibrated on this model
with ``calibrate=True`` and other noise) and TaylorSeerCache; cache-dit's DBCache (transformer-only
API). The caches need transformer blocks: their UNet rows are skipped. A last "baseline (again)"
row checks that every method left the model as it found it (PSNR inf).

Each runs eager and compiled. Compiled = regional ``torch.compile`` (as diffusers'
``compile_repeated_blocks``): each transformer block's / UNet down, mid and up block's forward is
compiled *below* every method's Python-level hooks, so skipping a block never recompiles it
(TaylorSeer hooks modules inside blocks; dynamo inlines those hooks). ``--compile-scope model``
compiles the whole hooked model instead (fresh per method; Python-level hooks graph-break and may
recompile, e.g. mmskip's step tracking once per timestep).

Per row: seconds per trajectory (median of ``--repeats`` after a warm-up trajectory), speedup vs
the baseline with the same compile setting (``mmskip.timing.paired``: interleaved rounds with the
method set up and torn down, untimed, around each of its calls; median ratio, quartiles as
``speedup_spread``; with ``--compile-scope model`` a ratio of medians, as each method compiles
afresh), FLOPs bound (mmskip: 1 / ``handle.stats()
["flops_fraction"]``; others: baseline / method FLOPs counted by ``torch.utils.flop_counter`` over
the eager warm-up trajectory, also given for mmskip as ``bound_counted``), speedup / bound,
fidelity of the final latent vs the eager baseline's from the same noise (PSNR with the
baseline's range as peak, relative L2; the compiled baseline row shows compile's own noise),
compile seconds (warm-up minus steady time), peak memory. Writes
``benchmarks/results/diffusion_gpu.json`` and ``.md``. Without CUDA it measures nothing and exits 0;
``--smoke`` runs every code path on CPU in float32 on tiny models (numbers meaningless).

    python benchmarks/diffusion_gpu.py                      # everything, ~5-8 min on one H100
    python benchmarks/diffusion_gpu.py --models flux --no-compile --repeats 5
    python benchmarks/diffusion_gpu.py --smoke --out /tmp/s.json
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import math
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import harness
import torch
from _gpu_denoisers import BUILDERS, Bench, Skipped, _randn


# -- methods -------------------------------------------------------------------------------------------------
@dataclass
class Applied:
    teardown: Callable[[], None]
    before: Callable[[], None] = lambda: None  # at the start of each trajectory
    stats: Callable[[], dict[str, Any]] = dict


@dataclass
class Method:
    name: str
    family: str
    setup: Callable[[Bench, bool], Applied]  # (bench, compiled) -> Applied


def _nothing(b: Bench, compiled: bool) -> Applied:
    return Applied(lambda: None)


def _mmskip(schedule: Any) -> Callable[[Bench, bool], Applied]:
    def setup(b: Bench, compiled: bool) -> Applied:
        import mmskip.diffusion

        # FLOPs are measured eagerly on the first call; compiled rows take the eager row's bound
        cfg = mmskip.diffusion.FeatureInheritanceConfig(schedule=schedule, measure_flops=not compiled)
        h = mmskip.apply(b.model, cfg)
        drop = ("items", "probe_changes")
        return Applied(h.remove, stats=lambda: {k: v for k, v in h.stats().items() if k not in drop})

    return setup


def _diffusers(kind: str, **kw: Any) -> Callable[[Bench, bool], Applied]:
    def setup(b: Bench, compiled: bool) -> Applied:
        from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

        if not hasattr(b.model, "enable_cache"):
            raise Skipped(f"diffusers' caches need transformer blocks; {type(b.model).__name__} has none")
        if kind == "fbc":
            cfg: Any = FirstBlockCacheConfig(**kw)
        elif kind == "taylorseer":  # the default identifiers fullmatch '^blocks.*attn': not Wan's attn1/attn2
            ids = [r"^blocks\.\d+\.attn[12]$", r"^blocks\.\d+\.ffn$"] if b.name == "wan" else None
            cfg = TaylorSeerCacheConfig(taylor_factors_dtype=torch.float32, cache_identifiers=ids, **kw)
        else:
            if "mag_ratios" not in b.extra:  # calibrate once per model (eager, other noise); it prints them
                b.model.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=b.steps))
                buf = io.StringIO()
                with contextlib.redirect_stdout(buf):
                    trajectory(b, noise(b, seed=1))
                b.model.disable_cache()
                lines = [ln for ln in buf.getvalue().splitlines() if ln.startswith("[") and ln.endswith("]")]
                b.extra["mag_ratios"] = ast.literal_eval(lines[-1])
            cfg = MagCacheConfig(mag_ratios=b.extra["mag_ratios"], num_inference_steps=b.steps, **kw)
        b.model.enable_cache(cfg)
        return Applied(b.model.disable_cache)

    return setup


def _cache_dit(threshold: float, taylorseer: bool = False) -> Callable[[Bench, bool], Applied]:
    def setup(b: Bench, compiled: bool) -> Applied:
        if b.name == "sd15":
            raise Skipped("cache-dit caches transformer blocks; the UNet has none")
        try:
            import cache_dit
        except ImportError as err:
            raise Skipped(f"cache-dit not installed ({err}); pip install cache-dit") from None

        def configs() -> dict[str, Any]:  # F1B0 (the first block probes, as FirstBlockCache); warm-up 8/28
            cfg = cache_dit.DBCacheConfig(
                Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold,
                max_warmup_steps=max(1, round(8 * b.steps / 28)), num_inference_steps=b.steps,
                enable_separate_cfg=False)
            cal = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1) if taylorseer else None
            return {"cache_config": cfg, **({"calibrator_config": cal} if cal else {})}

        # disable_cache() leaves Flux's patched forward in place, and every cached forward (mock.patch of the
        # block lists) moves the lists to the end of model._modules: restore both for the rows that follow
        model, order = b.model, list(b.model._modules)
        saved = [(m, m.__dict__.get("forward")) for m in (model, *b.regions)]

        def teardown() -> None:
            cache_dit.disable_cache(model)
            model.__dict__.pop("_is_patched", None)
            for m, fwd in saved:
                m.__dict__.pop("forward", None) if fwd is None else m.__dict__.__setitem__("forward", fwd)
            for k in order:
                model._modules[k] = model._modules.pop(k)

        cache_dit.enable_cache(model, **configs())  # transformer-only: a fresh context for each trajectory
        return Applied(teardown, before=lambda: cache_dit.refresh_context(model, **configs()))

    return setup


def methods() -> list[Method]:
    from mmskip.schedules import adaptive, interval

    return [
        Method("baseline", "baseline", _nothing),
        Method("mmskip FI every 2", "mmskip", _mmskip(interval(2))),
        Method("mmskip FI every 3", "mmskip", _mmskip(interval(3))),
        Method("mmskip FI adaptive 0.1", "mmskip", _mmskip(adaptive(0.1, "relative_change", warmup=2))),
        Method("diffusers FirstBlockCache 0.05", "diffusers-fbc", _diffusers("fbc", threshold=0.05)),
        Method("diffusers FirstBlockCache 0.1", "diffusers-fbc", _diffusers("fbc", threshold=0.1)),
        Method("diffusers MagCache 0.06", "diffusers-magcache", _diffusers("mag", threshold=0.06)),
        Method("diffusers MagCache 0.12", "diffusers-magcache", _diffusers("mag", threshold=0.12)),
        Method("diffusers TaylorSeer interval 3", "diffusers-taylorseer",
               _diffusers("taylorseer", cache_interval=3, disable_cache_before_step=3)),
        Method("cache-dit DBCache F1B0 0.08", "cache-dit", _cache_dit(0.08)),
        Method("cache-dit DBCache F1B0 0.16", "cache-dit", _cache_dit(0.16)),
        Method("cache-dit DBCache F1B0 0.16 + TaylorSeer", "cache-dit", _cache_dit(0.16, taylorseer=True)),
        Method("baseline (again)", "baseline-again", _nothing),
    ]


# -- measuring -----------------------------------------------------------------------------------------------
def noise(b: Bench, seed: int = 0) -> torch.Tensor:
    return _randn(*b.latent, seed=seed, dev=next(b.model.parameters()).device)


@torch.no_grad()
def trajectory(b: Bench, x0: torch.Tensor, applied: Applied | None = None) -> torch.Tensor:
    if applied is not None:
        applied.before()
    x = x0.clone()
    for i in range(b.steps):  # decreasing timesteps: mmskip's step tracker sees one trajectory
        x = b.step(x, i)
    if hasattr(b.model, "_reset_stateful_cache"):  # as diffusers pipelines do at the end of a call
        b.model._reset_stateful_cache()
    return x


def fidelity(x: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    mse, peak = float((x - ref).pow(2).mean()), float(ref.max() - ref.min())
    ok = math.isfinite(mse) and peak > 0
    psnr = float("inf") if mse == 0 else 10 * math.log10(peak**2 / mse) if ok else float("nan")
    return {"psnr": psnr, "rel_l2": float((x - ref).norm() / ref.norm().clamp_min(1e-12))}


def set_compiled(b: Bench, on: bool, backend: str) -> None:
    """Regional compilation: each region's forward becomes a compiled instance attribute, below any hook."""
    for m in b.regions:
        if on:
            m.forward = torch.compile(m.forward, backend=backend, dynamic=False)
        else:
            m.__dict__.pop("forward", None)


def run_row(b: Bench, method: Method, compiled: bool, args: argparse.Namespace,
            ref: dict[str, Any]) -> dict[str, Any]:
    dev = next(b.model.parameters()).device
    row: dict[str, Any] = {"model": b.name, "method": method.name, "family": method.family,
                           "compile": compiled, "dtype": str(b.dtype).replace("torch.", "")}
    whole = compiled and args.compile_scope == "model"
    applied = None
    try:
        applied = method.setup(b, compiled)
        if whole:
            torch._dynamo.reset()
            b.model.compile(backend=args.compile_backend, dynamic=False)
        x0 = noise(b)

        def warm_up() -> None:
            if compiled:
                trajectory(b, x0, applied)
            else:  # the eager warm-up counts FLOPs
                from torch.utils.flop_counter import FlopCounterMode

                with FlopCounterMode(display=False) as fc:
                    trajectory(b, x0, applied)
                row["flops"] = float(fc.get_total_flops())

        warm = harness.once(warm_up)[0]
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        out = trajectory(b, x0, applied)  # untimed: the output, the peak memory and the stats
        if dev.type == "cuda":
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if stats := applied.stats():
            row["mmskip_stats"] = stats
        if method.family.startswith("baseline") or whole:  # a lone figure (whole-model compile: per method)
            row["times"] = list(harness.repeated(lambda: trajectory(b, x0, applied), repeats=args.repeats, warmup=0))
        else:  # paired with the baseline (same compile), the method set up and torn down around each call
            applied.teardown()
            applied, held = None, {}
            cand = harness.Candidate(lambda: trajectory(b, x0, held["a"]),
                                     setup=lambda: held.__setitem__("a", method.setup(b, compiled)),
                                     teardown=lambda: held.pop("a").teardown())
            t = harness.paired(lambda: trajectory(b, x0), {"m": cand}, repeats=args.repeats)["m"]
            row.update({"times": list(t.candidate_s), "baseline_times": list(t.baseline_s),
                        "paired_speedup": t.speedup, "speedup_spread": list(t.spread), "pairs": t.pairs})
        row["s_per_traj"] = statistics.median(row["times"])
        if compiled:
            row["compile_s"] = max(warm - row["s_per_traj"], 0.0)
    except Skipped as err:
        row["skipped"] = str(err)
        return row
    except Exception as err:  # one failing method must not stop the run
        row["error"] = f"{type(err).__name__}: {err}"
        traceback.print_exc(limit=4)
        return row
    finally:
        if applied is not None:
            applied.teardown()
        if whole:
            b.model._compiled_call_impl = None
    if method.family == "baseline":
        ref.setdefault("x", out)  # the eager baseline's final latent is the reference
        ref[f"base_s_{compiled}"] = row["s_per_traj"]
    if not compiled:
        ref[method.name] = row
    if "x" in ref:  # (unless the eager baseline failed)
        row.update(fidelity(out, ref["x"]))
    base_s = ref.get(f"base_s_{compiled}")
    row["speedup"] = row.pop("paired_speedup", None) or (base_s / row["s_per_traj"] if base_s else None)
    eager, base = ref.get(method.name, {}), ref.get("baseline", {})
    if eager.get("flops") and base.get("flops"):
        row["bound_counted"] = base["flops"] / eager["flops"]
    frac = eager.get("mmskip_stats", {}).get("flops_fraction")
    row["bound"] = 1 / frac if frac else row.get("bound_counted")
    if row["bound"] and row["speedup"]:
        row["of_bound"] = row["speedup"] / row["bound"]
    if "baseline_times" in row and row["bound"]:
        row["bound_warning"] = harness.Timing(tuple(row["baseline_times"]), tuple(row["times"])
                                              ).bound_warning(1 / row["bound"])
    return row


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| model | method | compile | dtype | s/traj | speedup | bound | of bound | PSNR dB | rel L2 "
            "| compile s | peak GB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lead = f"| {r['model']} | {r['method']} | {'on' if r['compile'] else 'off'} | {r['dtype']} |"
        if "s_per_traj" not in r:
            why = f"skipped: {r['skipped']}" if "skipped" in r else f"error: {r['error'][:100]}"
            lines.append(f"{lead} {why} |" + " |" * 7)
            continue
        cells = [_fmt(r["s_per_traj"], ".3f"), _fmt(r.get("speedup"), ".2f"), _fmt(r.get("bound"), ".2f"),
                 _fmt(r.get("of_bound"), ".2f"), _fmt(r.get("psnr"), ".1f"), _fmt(r.get("rel_l2"), ".4f"),
                 _fmt(r.get("compile_s"), ".1f"), _fmt(r.get("peak_mem_gb"), ".1f")]
        lines.append(f"{lead} {' | '.join(cells)} |")
    return "\n".join(lines)


def _status(r: dict[str, Any]) -> str:
    if "s_per_traj" not in r:
        return r.get("skipped") or r["error"]
    return (f"{r['s_per_traj']:.3f} s/traj, speedup {_fmt(r.get('speedup'), '.2f')}, "
            f"bound {_fmt(r.get('bound'), '.2f')}, PSNR {_fmt(r.get('psnr'), '.1f')}"
            + (f", compile {r['compile_s']:.1f} s" if "compile_s" in r else ""))


def main(argv: list[str] | None = None) -> int:
    ap = harness.arguments(__doc__, threads=None, full_doc=True,
                           smoke="CPU, float32, tiny models, 3 steps, 3 repeats; compile (backend eager) on flux, wan")
    ap.add_argument("--models", default="sd15,flux,wan", help="comma-separated: sd15, flux, wan")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: sd15 50, flux/wan 28)")
    ap.add_argument("--no-compile", action="store_true", help="eager rows only")
    ap.add_argument("--compile-scope", choices=("blocks", "model"), default="blocks")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--only", default=None, help="comma-separated name substrings: only these methods")
    ap.add_argument("--flux-layers", type=lambda s: tuple(int(v) for v in s.split(",")), default=(4, 8),
                    help="double,single blocks of the Flux-shaped model (Flux-dev: 19,38)")
    ap.add_argument("--wan-layers", type=int, default=8, help="blocks of the Wan-shaped model (Wan 1.3B: 30)")
    ap.add_argument("--wan-frames", type=int, default=5, help="latent frames (video frames: 4 (n - 1) + 1)")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("diffusion_gpu: no CUDA device, nothing measured (--smoke checks the code paths on CPU)")
        return 0
    dev = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        args.steps, args.repeats, args.compile_backend = args.steps or 3, 3, "eager"
    dyn = torch._dynamo.config  # blocks of one class share graphs; UNet blocks differ in shape
    setattr(dyn, "recompile_limit" if hasattr(dyn, "recompile_limit") else "cache_size_limit", 64)
    out = args.out or harness.RESULTS / ("diffusion_gpu_smoke.json" if args.smoke else "diffusion_gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    import diffusers

    try:
        from importlib.metadata import version

        cache_dit_version: str | None = version("cache-dit")
    except Exception:
        cache_dit_version = None
    meta = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else f"cpu {platform.machine()}",
            "torch": torch.__version__, "diffusers": diffusers.__version__, "cache_dit": cache_dit_version,
            "smoke": args.smoke, "repeats": args.repeats, "compile_scope": args.compile_scope,
            "compile_backend": args.compile_backend, "date": time.strftime("%Y-%m-%d")}
    results: dict[str, Any] = {"meta": meta, "models": {}, "rows": []}
    print("diffusion_gpu: " + ", ".join(f"{k} {v}" for k, v in meta.items()), flush=True)
    ms = methods()
    if args.only:
        keep = args.only.split(",")
        ms = [m for m in ms if m.family.startswith("baseline") or any(s in m.name for s in keep)]
    for name in args.models.split(","):
        builder, default_steps = BUILDERS[name]
        t0 = time.perf_counter()
        torch.manual_seed(0)  # the same random weights in every run
        try:
            b = builder(dev, args.smoke, args.steps or default_steps, args)
        except Exception as err:  # e.g. out of memory: the other models still run
            traceback.print_exc(limit=4)
            results["rows"].append({"model": name, "method": "(build)", "family": "build", "compile": False,
                                    "dtype": "-", "error": f"{type(err).__name__}: {err}"})
            continue
        n = sum(p.numel() for p in b.model.parameters())
        results["models"][name] = {"shape": b.shape, "steps": b.steps, "params": n, "dtype": str(b.dtype)}
        print(f"[{name}] {b.shape}; {n / 1e6:.1f}M params, {b.steps} steps, "
              f"built in {time.perf_counter() - t0:.1f} s", flush=True)
        ref: dict[str, Any] = {}
        skip_compile = args.no_compile or (args.smoke and name == "sd15")
        for compiled in (False,) if skip_compile else (False, True):
            if compiled and args.compile_scope == "blocks":
                set_compiled(b, True, args.compile_backend)
            for m in ms:
                row = run_row(b, m, compiled, args, ref)
                results["rows"].append(row)
                print(f"[{name}] {m.name}, compile {'on' if compiled else 'off'}: {_status(row)}", flush=True)
                tmp = out.with_suffix(".json.tmp")  # a process killed while writing leaves the last whole file
                tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
                tmp.replace(out)
            if compiled and args.compile_scope == "blocks":
                set_compiled(b, False, args.compile_backend)
                torch._dynamo.reset()
        results["models"][name]["mag_ratios"] = b.extra.get("mag_ratios")
        del b, ref
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    text = table(results["rows"])
    print(text)
    md = ["# benchmarks/diffusion_gpu.py", "", ", ".join(f"{k}: {v}" for k, v in meta.items()), ""]
    md += [f"* {k}: {v['shape']}, {v['params'] / 1e6:.1f}M params, {v['steps']} steps, {v['dtype']}"
           for k, v in results["models"].items()]
    harness.write(out, results, "\n".join([*md, "", text]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
