"""mmskip.tune on the zoo: the tuned setting against the best fewer-steps setting at each floor, held out.

For each model, one search (its trial log is shared by the floors: the floor only picks the
finalists) on calibration inputs, then for each floor the finalists confirmed on held-out inputs
with paired timing against the unmodified baseline. Reported per floor: the tuned setting, the
fastest fewer-steps setting meeting the same floor (pipelines), their paired speedups (median and
quartiles), held-out quality and FLOPs bounds, and ``tuned / fewer``, the ratio of the two medians
(each paired against the same baseline in the same run, not paired with each other).

    python benchmarks/tune.py --models digits-dit --floors 30,35 --budget 5m
    python benchmarks/tune.py --models stdlib-lm,stdlib-lm-skip --floors 0.8,0.9,1.0
    python benchmarks/tune.py --models stdlib-lm-skip --fresh   # retrained weights: start the search over
    python benchmarks/tune.py --smoke
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

import harness

import mmskip
from mmskip.tuning import make_target
from mmskip.tuning.cli import load_model, stock_inputs

SAMPLER = {"digits-dit": "dpm++2m", "digits-sd": "dpm++2m"}  # the headline samplers of benchmarks/diffusion.py
STEPS = {"digits-dit": 25, "digits-sd": 25, "scenes-flux": 28}


def headline_target(name: str, steps: int | None = None, max_new_tokens: int | None = None) -> Any:
    """The tuning target of zoo model ``name`` at the benchmarks' headline settings: pipelines get their
    sampler and step count and, when ``benchmarks/diffusion.py`` fitted them, the Gaussian stats (so
    the analytic jump over the first steps is a candidate); language models ``max_new_tokens``."""
    model, options = load_model(name)
    if "tokenizer" in options:
        if max_new_tokens is not None:
            options["max_new_tokens"] = max_new_tokens
    else:
        options["steps"] = steps or STEPS.get(name)
        stats = harness.RESULTS / f"diffusion_gaussian_{name}.safetensors"
        if stats.is_file():
            options["gaussian_stats"] = str(stats)
        if name in SAMPLER:
            from mmskip.diffusion.sampler_names import make_scheduler

            model.scheduler = make_scheduler(model.scheduler, SAMPLER[name])
    return make_target(model, **options)


def tune_model(name: str, floors: list[float], args: Any) -> dict[str, Any]:
    from mmskip.tuning.trial_log import TrialLogMismatch

    if args.fresh and (args.runs / name).is_dir():
        shutil.rmtree(args.runs / name)
        print(f"{name}: --fresh, the earlier trial log is deleted")
    try:
        return _tune_floors(name, floors, args)
    except TrialLogMismatch as e:
        raise SystemExit(f"{name}: {e}; or rerun with --fresh") from e


def _tune_floors(name: str, floors: list[float], args: Any) -> dict[str, Any]:
    target = headline_target(name, args.steps, args.max_new_tokens)
    calib, held = stock_inputs(name, target, args.inputs), stock_inputs(name, target, args.held_out, offset=args.inputs)
    rows, results = [], {}
    for floor in floors:
        t0 = time.perf_counter()
        r = mmskip.tune(target, calib, held_out=held, floor=floor, budget=args.budget, out=args.runs / name,
                        repeats=args.repeats, finalists=args.finalists, progress=not args.no_progress)
        fewer = max((m for m in r.measured if m.candidate.family == "fewer-steps" and m.quality[r.metric] >= floor),
                    key=lambda m: m.speedup, default=None)
        best = r.best_measured
        rows.append({"model": name, "metric": r.metric, "floor": floor, "tuned": best.candidate.label,
                     "tuned_family": best.candidate.family, "tuned_speedup": best.speedup, "tuned_spread": best.spread,
                     "tuned_quality": best.quality[r.metric], "tuned_flops_bound": best.flops_bound,
                     "fewer": fewer.candidate.label if fewer else None, "fewer_speedup": fewer.speedup if fewer else None,
                     "fewer_quality": fewer.quality[r.metric] if fewer else None,
                     "tuned_over_fewer": best.speedup / fewer.speedup if fewer else None,
                     "message": r.message, "trials": r.trials, "seconds": time.perf_counter() - t0})
        results[str(floor)] = r
    return {"rows": rows, "results": results}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = harness.arguments(__doc__, repeats=5, out=harness.RESULTS / "tune.json", full_doc=True)
    p.add_argument("--models", default="digits-dit", help="comma-separated zoo names")
    p.add_argument("--floors", default=None, help="comma-separated floors on the model's metric "
                   "(default: 30,35 dB PSNR for pipelines, 0.8,0.9,1.0 agreement for LMs)")
    p.add_argument("--budget", default="5m", help="search budget per model: trials or time (5m)")
    p.add_argument("--inputs", type=int, default=8, help="calibration inputs")
    p.add_argument("--held-out", type=int, default=16, help="held-out inputs")
    p.add_argument("--finalists", type=int, default=6)
    p.add_argument("--steps", type=int, default=None, help="pipelines: baseline steps (default: the model's headline)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--runs", type=Path, default=harness.RESULTS / "tune_runs", help="trial logs (one per model)")
    p.add_argument("--fresh", action="store_true",
                   help="start each model's search over (its trial log is deleted first); without it a search "
                        "continues its log, and a log of other weights or settings stops the run")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.budget, args.inputs, args.held_out, args.finalists = "digits-dit,stdlib-lm", "2", 1, 1, 1
        args.steps, args.max_new_tokens, args.repeats, args.no_progress = 4, 4, 3, True
        args.floors = args.floors or "0"
        if args.runs == harness.RESULTS / "tune_runs":
            args.runs = args.out.parent / "tune_smoke_runs"
    harness.setup(args)
    out: dict[str, Any] = {"meta": {"machine": harness.machine(), "budget": args.budget, "inputs": args.inputs,
                                    "held_out": args.held_out, "repeats": args.repeats, "smoke": args.smoke},
                           "rows": []}
    fronts: dict[str, Any] = {}
    md = []
    for name in args.models.split(","):
        lm = name.startswith("stdlib")
        floors = [float(f) for f in (args.floors or ("0.8,0.9,1.0" if lm else "30,35")).split(",")]
        got = tune_model(name, floors, args)
        out["rows"] += got["rows"]
        for floor, r in got["results"].items():
            fronts[f"{name} @ {r.metric} >= {floor}"] = r
            out.setdefault("results", {})[f"{name}@{floor}"] = r.to_dict()
            md.append(f"### {name}, {r.metric} >= {floor}\n\n{r.message}\n\n{r.table()}\n")
    head = ["model", "floor", "tuned (held-out)", "speedup", "quality", "FLOPs bound", "best fewer steps", "speedup",
            "tuned / fewer"]

    def f(x: Any, fmt: str = "{:.2f}") -> str:
        return "-" if x is None else fmt.format(x)

    rows = [[r["model"], f"{r['metric']} >= {r['floor']:g}", r["tuned"],
             f"{r['tuned_speedup']:.2f}x ({r['tuned_spread'][0]:.2f}-{r['tuned_spread'][1]:.2f})",
             f(r["tuned_quality"], "{:.3g}"), f(r["tuned_flops_bound"], "{:.2f}x"), r["fewer"] or "-",
             f(r["fewer_speedup"], "{:.2f}x"), f(r["tuned_over_fewer"], "{:.2f}x")] for r in out["rows"]]
    summary = harness.table(head, rows)
    print(summary)

    def plot(png: Path) -> None:
        fig = harness.figure(figsize=(6.4 * min(3, len(fronts)), 4.4 * ((len(fronts) + 2) // 3)))
        for i, (title, r) in enumerate(fronts.items()):
            ax = fig.add_subplot((len(fronts) + 2) // 3, min(3, len(fronts)), i + 1)
            r.plot(ax=ax)  # the library's front plot, one panel per model and floor
            ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(png, dpi=110)

    harness.write(args.out, out, summary + "\n\n" + "\n".join(md), plot=plot)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
