"""Diffusion acceleration benchmark: mmskip vs the fewer-steps front, DeepCache, diffusers' caches, cache-dit.

Zoo models (``benchmarks/_diffusion_models.py``), each at the sampler users run: ``digits-dit`` and
``digits-sd`` with DPM-Solver++ 2M at 25 steps, ``scenes-flux`` (a Flux-shaped flow-matching
text-to-image model) with flow-matching Euler at 28 steps; CFG 4, CPU. ``--sampler ddim --steps 50``
gives the secondary DDIM-50 baseline. Every method generates the same conditions with the same
seeds; for each we report

* speedup: median over ``--repeats`` (at least 3) pairs of (baseline seconds / method seconds),
  ``mmskip.timing.paired``: interleaved rounds on the same ``--time-batch`` images, so the drift of a
  shared machine cancels; ``speedup_spread`` its quartiles; setting the method up and tearing it
  down is untimed (the quality run before is the warm-up);
* bound: 1 / (FLOPs spent / baseline FLOPs), whole pipeline (text encoders, VAE included),
  counted with ``torch.utils.flop_counter`` on a 2-image run;
* PSNR / SSIM of the images vs the baseline's images (fidelity);
* FID vs held-out real images (zoo classifier features), accuracy (digits: class; scenes: every
  attribute of the prompt right), CLIP score (digits, zoo CLIP).

The fewer-steps front is the headline sampler at several step counts; a method is *above the
front* when its PSNR beats the front interpolated at the method's speedup (``above_front_db``).
mmskip methods are specs (``benchmarks/_diffusion_methods.py``); ``--specs`` adds more (e.g. the
best ones ``benchmarks/diffusion_search.py`` found). Writes ``benchmarks/results/diffusion.json``,
``.md`` and ``diffusion_pareto.png``. ``--smoke`` runs every code path in seconds (numbers
meaningless; results beside ``--out``).

    python benchmarks/diffusion.py --models scenes-flux --n 500
    python benchmarks/diffusion.py --models digits-dit --sampler ddim --steps 50 --out /tmp/ddim.json
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _diffusion_methods as dm
import _diffusion_models as zm
import harness
import torch

RESULTS = harness.RESULTS


# -- measuring ---------------------------------------------------------------------------------------


def gaussian_stats(model: zm.ZooModel, smoke: bool, folder: Path = RESULTS) -> str | None:
    """The latent Gaussian (mean + PCA) of the training digits, cached in ``folder`` (safetensors).

    ``None`` for scenes-flux: its pipeline passes a dynamically shifted sigma grid, known only inside
    the call, and the Gaussian jump refuses it.
    """
    from mmskip.diffusion import GaussianStats

    if model.kind == "flux":
        return None
    path = folder / f"diffusion_gaussian_{model.name}{'_smoke' if smoke else ''}.safetensors"

    def build() -> GaussianStats:
        if smoke:
            return GaussianStats.fit(torch.randn(64, 4, 8, 8), rank=16)
        from mmskip.zoo.data import load_split

        x = load_split("train")[0]
        if x.shape[1] != model.pipe.vae.config.in_channels:
            x = x.repeat(1, model.pipe.vae.config.in_channels, 1, 1)
        return GaussianStats.from_images(x, vae=model.pipe.vae, rank=64)

    GaussianStats.cached(path, build)
    return str(path)


def pipeline_flops(model: zm.ZooModel, runner: Any, steps: int, before: Callable[[], None] | None) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        model.generate(runner, 2, steps, 1234, 2, before)
    return float(fc.get_total_flops())


def front_psnr(front: list[tuple[float, float]], speedup: float) -> float | None:
    """PSNR of the fewer-steps front at ``speedup``, linear in log(speedup) between its points (None outside)."""
    pts = sorted(front)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= speedup <= x1:
            w = (math.log(speedup) - math.log(x0)) / (math.log(x1) - math.log(x0)) if x1 > x0 else 0.0
            return y0 + w * (y1 - y0)
    return None


def mark_front(rows: list[dict[str, Any]]) -> None:
    """``above_front_db``: PSNR minus the front's PSNR at the row's speedup (and at its FLOPs bound)."""
    pts = [r for r in rows if r["family"] == "fewer-steps" and "speedup" in r and "psnr" in r]
    for key in ("speedup", "bound"):
        front = sorted((r[key], r["psnr"]) for r in pts)
        for r in rows:
            if r["family"] in ("baseline", "noise-floor", "fewer-steps") or "psnr" not in r or key not in r:
                continue
            ref = front_psnr(front, r[key])
            if ref is not None:
                r["above_front_db" if key == "speedup" else "above_front_db_at_bound"] = r["psnr"] - ref


def run_model(name: str, args: argparse.Namespace,
              make_methods: Callable[[zm.ZooModel, str | None], list[dm.Method]] | None = None) -> dict[str, Any]:
    """Measure every method on ``name`` (``make_methods(model, stats_path)``; default: :func:`dm.methods_for`)."""
    from mmskip.eval import psnr, ssim

    model = zm.load(name, args.smoke, args.sampler, args.steps, args.guidance)
    stats_path = gaussian_stats(model, args.smoke, args.out.parent if args.smoke else RESULTS)
    if make_methods is None:
        methods = dm.methods_for(model, stats_path, args.specs)
    else:
        methods = make_methods(model, stats_path)
    if args.only:
        methods = [m for m in methods if m.family == "baseline" or any(s in m.name for s in args.only)]
    rows: list[dict[str, Any]] = []
    base_imgs: torch.Tensor | None = None
    base_times: list[float] = []
    base_flops = 1.0

    def steps_of(method: dm.Method) -> int:
        steps = method.steps or model.steps
        return min(steps, model.steps) if args.smoke else steps

    def paired(method: dm.Method) -> harness.Timing:
        """The baseline and the method on the same images in interleaved rounds (drift cancels); the method
        is set up before and torn down after each of its timed calls, untimed."""
        held: dict[str, Any] = {}

        def setup() -> None:
            held["teardown"] = method.setup(model)
            held["runner"] = model.pipe.__dict__.get("_bench_pipe", model.pipe)
            held["before"] = model.pipe.__dict__.get("_bench_before")

        def teardown() -> None:
            if held.get("teardown") is not None:
                held.pop("teardown")()

        base = lambda: model.generate(model.pipe, args.time_batch, model.steps, 100, args.time_batch)  # noqa: E731
        cand = harness.Candidate(lambda: model.generate(held["runner"], args.time_batch, steps_of(method), 100,
                                                        args.time_batch, held["before"]), setup, teardown)
        # warm-up 0: the quality run just before ran (and warmed) both paths; a dropped round costs 2 x time-batch
        # at least 3 rounds: a median and quartiles
        return harness.paired(base, {"m": cand}, repeats=max(args.repeats, 3), warmup=0)["m"]

    for method in methods:
        print(f"[{name}] {method.name} ...", flush=True)
        row: dict[str, Any] = {"method": method.name, "family": method.family, "steps": steps_of(method)}
        if method.note:
            row["note"] = method.note
        teardown = None
        try:
            teardown = method.setup(model)
            before = model.pipe.__dict__.get("_bench_before")
            runner = model.pipe.__dict__.get("_bench_pipe", model.pipe)
            steps = steps_of(method)
            if not args.smoke:
                model.generate(runner, 2, steps, 99, 2, before)  # warm-up
            # a lone run: its wall time is indicative (the drift check, --repeats 0)
            row["quality_run_s"], imgs = harness.once(functools.partial(
                model.generate, runner, args.n, steps, args.seed + method.seed_offset, args.batch, before))
            if model.pipe.skip_enabled:
                row["skip_stats"] = {k: v for k, v in model.pipe.skip_stats().items() if k != "items"}
            row["flops"] = pipeline_flops(model, runner, steps, before)
            if args.repeats and method.family != "baseline":
                if teardown is not None:
                    teardown()
                teardown = None
                t = paired(method)
                row["paired_baseline_s"], row["paired_method_s"] = list(t.baseline_s), list(t.candidate_s)
                row["speedup"], row["speedup_spread"], row["pairs"] = t.speedup, list(t.spread), t.pairs
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
        row.update(model.metrics(imgs, args.n))
        rows.append(row)
    # the baseline again at the end: drift of the machine's speed shows here
    print(f"[{name}] baseline (again) ...", flush=True)
    base_times.append(harness.once(lambda: model.generate(model.pipe, args.n, model.steps, args.seed, args.batch))[0])
    for row in rows:
        if "paired_method_s" in row:
            row["bound_warning"] = harness.Timing(tuple(row["paired_baseline_s"]), tuple(row["paired_method_s"])
                                                  ).bound_warning(row.get("flops_fraction"))
        elif "quality_run_s" in row:  # --repeats 0: one unpaired run, indicative only
            row["speedup"] = statistics.median(base_times) / row["quality_run_s"]
        if row["family"] == "baseline":
            # by definition; how much the machine's speed drifted between its two timed runs:
            row["timing_drift"] = max(base_times) / min(base_times)
            row["speedup"] = 1.0
    mark_front(rows)
    return {"pipeline": type(model.pipe).__mro__[2].__name__, "sampler": model.sampler, "steps": model.steps,
            "n": args.n, "baseline_times_s": base_times, "rows": rows}


# -- reporting ---------------------------------------------------------------------------------------


def print_table(name: str, res: dict[str, Any]) -> str:
    head = (f"{'method':46s} {'speedup':>7s} {'bound':>6s} {'PSNR':>6s} {'vsfront':>7s} {'SSIM':>5s} {'FID':>7s} "
            f"{'CLIP':>6s} {'acc':>5s}")
    lines = [f"## {name} ({res['pipeline']}, {res.get('sampler', 'ddim')} {res.get('steps', 50)} steps)", "", "```",
             head]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"{r['method']:46s} n/a: {r['error'][:70]}")
            continue

        def f(k: str, fmt: str, r: dict[str, Any] = r) -> str:
            return format(r[k], fmt) if k in r else "-"

        psnr_s = "inf" if r.get("psnr") == float("inf") else f("psnr", "6.2f")
        lines.append(f"{r['method']:46s} {f('speedup', '7.2f')} {f('bound', '6.2f')} {psnr_s:>6s} "
                     f"{f('above_front_db', '+7.2f')} {f('ssim', '5.3f')} {f('fid', '7.2f')} {f('clip_score', '6.2f')} "
                     f"{f('accuracy', '5.3f')}")
    lines.append("```")
    text = "\n".join(lines)
    print(text)
    return text


COLORS = {"baseline": "black", "noise-floor": "lightgray", "fewer-steps": "tab:gray", "mmskip": "tab:red",
          "deepcache": "tab:blue", "diffusers-fbc": "tab:green", "diffusers-taylorseer": "tab:olive",
          "diffusers-magcache": "tab:cyan", "cache-dit": "tab:purple"}


def plot(results: dict[str, Any], path: Path) -> None:
    """Speedup vs FID (top) and vs PSNR to the baseline's images (bottom), one column per model; the
    fewer-steps front is drawn as a line through the baseline."""
    models = list(results["models"])
    fig = harness.figure(figsize=(7 * len(models), 9))
    axes = fig.subplots(2, len(models), squeeze=False)
    for col, name in enumerate(models):
        res = results["models"][name]
        rows = [r for r in res["rows"] if "speedup" in r]
        base = next((r["method"].removeprefix("baseline ") for r in rows if r["family"] == "baseline"), "baseline")
        for row_i, ykey in enumerate(("fid", "psnr")):
            ax = axes[row_i][col]
            if ykey == "fid" and not any("fid" in r for r in rows):
                ykey = "ssim"
            front = sorted((r["speedup"], r[ykey]) for r in rows
                           if r["family"] in ("fewer-steps", "baseline") and ykey in r and r[ykey] != float("inf"))
            if len(front) > 1:
                ax.plot([p[0] for p in front], [p[1] for p in front], color="tab:gray", lw=1, zorder=0,
                        label="fewer-steps front")
            for fam, color in COLORS.items():
                if fam == "noise-floor" and ykey == "psnr":
                    continue  # other seeds: a different image, PSNR says nothing
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
            if ykey == "psnr":  # a method that never skips sits at 100 dB: keep the front readable
                vals = [r["psnr"] for r in rows if r["family"] != "noise-floor" and 0 < r.get("psnr", 0) < 90]
                if vals:
                    ax.set_ylim(min(vals) - 2, max(vals) + 2)
            ax.set_xscale("log")
            ax.set_xlabel(f"speedup vs {base} (paired wall time, same run)")
            ax.set_ylabel({"fid": "FID vs held-out real images (lower is better)",
                           "psnr": f"PSNR to the {base} images, dB (higher is better)", "ssim": "SSIM"}[ykey])
            ax.set_title(f"{name}: speedup vs {ykey.upper()}")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def add_rows(path: Path, name: str, new: dict[str, Any]) -> dict[str, Any]:
    """``path``'s results with this run's rows for ``name`` added (same sampler, steps and n; the
    baseline images are the same seeds, so PSNR is comparable; speedups are per-row paired ratios)."""
    old = json.loads(path.read_text())
    res, add = old["models"][name], new["models"][name]
    for key in ("sampler", "steps", "n"):
        if res.get(key) != add.get(key):
            raise ValueError(f"--add-to {path}: its {key} is {res.get(key)!r}, this run's {add.get(key)!r}")
    known = {r["method"] for r in res["rows"]}
    res["rows"] += [r for r in add["rows"] if r["family"] != "baseline" and r["method"] not in known]
    order = {"baseline": 0, "noise-floor": 1, "fewer-steps": 2}
    res["rows"].sort(key=lambda r: (order.get(r["family"], 3), -r["steps"] if r["family"] == "fewer-steps" else 0))
    for r in res["rows"]:
        r.pop("above_front_db", None), r.pop("above_front_db_at_bound", None)
    mark_front(res["rows"])
    return old


def merge(parts: list[Path], out: Path) -> int:
    """One JSON, table and plot from per-model runs (each run keeps its own settings)."""
    results: dict[str, Any] = {"runs": {}, "models": {}}
    for p in parts:
        d = json.loads(p.read_text())
        for name, res in d["models"].items():
            results["models"][name] = res
            results["runs"][name] = {k: v for k, v in d.items() if k != "models"}
    tables = []
    for name, res in results["models"].items():
        run = results["runs"][name]
        head = f"torch.set_num_threads({run['torch_threads']}), CPU, n={run['n']} images, CFG {run['guidance_scale']}"
        tables.append(head + "\n\n" + print_table(name, res))
    harness.write(out, results, "\n\n".join(tables), lambda png: plot(results, png), out.with_name(out.stem + "_pareto.png"))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = harness.arguments(__doc__, full_doc=True, smoke="tiny pipelines, every code path, seconds")
    ap.add_argument("--models", nargs="+", default=["scenes-flux", "digits-dit", "digits-sd"])
    ap.add_argument("--sampler", choices=zm.SAMPLERS, default=None,
                    help="default: dpm++2m for the digits models, euler (flow matching) for scenes-flux")
    ap.add_argument("--steps", type=int, default=None, help="headline steps (default: 25 digits, 28 scenes-flux)")
    ap.add_argument("--n", type=int, default=300, help="images per method (quality metrics; its wall time is timed)")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--guidance", type=float, default=None, help="CFG scale (default 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-batch", type=int, default=50, help="images per paired timing (--repeats pairs: "
                    "baseline then method, alternating)")
    ap.add_argument("--only", nargs="*", help="run only methods whose name contains one of these")
    ap.add_argument("--specs", nargs="*", default=[], help="more mmskip specs (see benchmarks/_diffusion_methods.py)")
    ap.add_argument("--merge", nargs="+", type=Path, help="combine earlier result JSONs (one per model) into --out")
    ap.add_argument("--add-to", type=Path, default=None,
                    help="an earlier result JSON of the same settings: this run's rows (with --only) are added to it")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out or RESULTS / "diffusion.json")
    harness.setup(args)
    if args.smoke:  # every code path, as little work as possible
        args.n, args.steps, args.repeats = min(args.n, 2), min(args.steps or 4, 4), min(args.repeats, 3)
        args.batch, args.time_batch = min(args.batch, 2), min(args.time_batch, 2)
    out = args.out or RESULTS / ("diffusion_smoke.json" if args.smoke else "diffusion.json")
    args.out = out
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "torch_threads": torch.get_num_threads(), "device": "cpu", "torch": torch.__version__, "n": args.n,
        "guidance_scale": args.guidance or 4.0, "repeats": args.repeats, "time_batch": args.time_batch, "models": {},
    }
    print(f"torch.set_num_threads({torch.get_num_threads()}); CPU; n={args.n}", flush=True)
    tables = []
    for name in args.models:
        results["models"][name] = run_model(name, args)
        if args.add_to is not None:
            results = add_rows(args.add_to, name, results)
        out.write_text(json.dumps(results, indent=1, default=str) + "\n")
        tables.append(print_table(name, results["models"][name]))
    harness.write(out, results, "\n\n".join(tables), lambda png: plot(results, png), out.with_name(out.stem + "_pareto.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
