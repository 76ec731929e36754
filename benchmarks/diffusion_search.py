"""Search mmskip's configurations for points above the fewer-steps front (issue: "find the point above the front").

Two stages on calibration conditions and seeds kept apart from the benchmark's (conditions
2000.., seed 5000), ranked by FLOPs (deterministic, unlike wall time on a shared machine):

1. at the headline step count, every feature-inheritance schedule (interval 2/3/4, adaptive
   thresholds, non-uniform and calibrated keep sets at two densities) x target set x granularity;
2. the best stage-1 configurations (by PSNR margin over the front at equal FLOPs) again at
   fewer steps, since inheritance and fewer steps compose.

For each: whole-pipeline FLOPs bound (FLOPs of the headline / FLOPs spent) and PSNR to the
headline's images; ``margin_db`` = PSNR minus the fewer-steps front's PSNR at the same bound.
The front itself is measured densely (every step count down to ~15 % of the headline's).
The winners are then measured with wall time and the quality metrics by ``benchmarks/diffusion.py
--specs ...``. Writes ``benchmarks/results/diffusion_search_<model>.json`` / ``.md`` / ``.png``.

    python benchmarks/diffusion_search.py --model scenes-flux
    python benchmarks/diffusion_search.py --model digits-dit --n 48
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import _diffusion_methods as dm
import _diffusion_models as zm
import harness
import torch
from tqdm import tqdm

import diffusion as bench

OFFSET, SEED = 2000, 5000
TARGETS = {"dit": ("default", "deep", "all"), "sd": ("default", "deepcache"), "flux": ("default", "deep", "all", "single")}


def stage1_specs(model: zm.ZooModel) -> list[str]:
    n = model.steps
    scheds = ["interval:2", "interval:3", "interval:4", "adaptive:0.05", "adaptive:0.1", "adaptive:0.2",
              "adaptive:0.3", f"nonuniform:{round(0.5 * n)}", f"nonuniform:{round(0.35 * n)}",
              f"calibrated:{round(0.5 * n)}", f"calibrated:{round(0.35 * n)}"]
    specs = [f"fi={s} targets={t}" for s in scheds for t in TARGETS[model.kind]]
    specs += [f"fi={s} gran={g}" for s in scheds for g in ("layer", "unit")]
    return specs


def with_steps(spec: str, steps: int, headline: int) -> str:
    """``spec`` at ``steps``, its keep-set counts scaled to the new step count."""
    toks = []
    for tok in spec.split():
        key, _, value = tok.partition("=")
        kind, _, arg = value.partition(":")
        if key == "fi" and kind in ("nonuniform", "calibrated"):
            tok = f"fi={kind}:{max(2, round(int(arg) * steps / headline))}"
        toks.append(tok)
    return f"steps={steps} " + " ".join(toks)


def measure(model: zm.ZooModel, method: dm.Method, n: int, batch: int, base: torch.Tensor | None,
            base_flops: float) -> dict[str, Any]:
    from mmskip.eval import psnr

    steps = method.steps or model.steps
    teardown = method.setup(model)
    try:
        # one run, its wall time a lone indicative figure (ranking is by FLOPs)
        wall, imgs = harness.once(lambda: model.generate(model.pipe, n, steps, SEED, batch, offset=OFFSET))
        flops = bench.pipeline_flops(model, model.pipe, steps, None)
    finally:
        if teardown is not None:
            teardown()
    row = {"spec": method.name.removeprefix("mmskip "), "steps": steps, "flops": flops, "wall_s": wall,
           "bound": base_flops / flops if base_flops else 1.0, "imgs": imgs}
    if base is not None:
        row["psnr"] = psnr(imgs, base)
    return row


def margin(front: list[tuple[float, float]], row: dict[str, Any]) -> float | None:
    ref = bench.front_psnr(front, row["bound"])
    return None if ref is None else row["psnr"] - ref


def plot(res: dict[str, Any], path: Path) -> None:
    fig = harness.figure(figsize=(8, 5.5))
    ax = fig.add_subplot()
    fr = sorted((r["bound"], r["psnr"]) for r in res["front"])
    ax.plot([p[0] for p in fr], [p[1] for p in fr], "o-", color="tab:gray", label="fewer steps (front)")
    for stage, color in (("stage1", "tab:orange"), ("stage2", "tab:red")):
        pts = [r for r in res[stage] if "psnr" in r]
        ax.scatter([r["bound"] for r in pts], [r["psnr"] for r in pts], s=12, color=color, alpha=0.7,
                   label=f"{stage}: {len(pts)} mmskip configs")
    for r in res["best"][:5]:
        ax.annotate(r["spec"], (r["bound"], r["psnr"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs bound vs the headline (whole pipeline)")
    ax.set_ylabel(f"PSNR to {res['headline']} images, dB")
    ax.set_title(f"{res['model']}: search over mmskip configurations ({res['n']} calibration images)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main(argv: list[str] | None = None) -> int:
    ap = harness.arguments(__doc__, repeats=None, full_doc=True, smoke="tiny pipelines, a few configurations, seconds")
    ap.add_argument("--model", default="scenes-flux", choices=["scenes-flux", "digits-dit", "digits-sd"])
    ap.add_argument("--sampler", choices=zm.SAMPLERS, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--n", type=int, default=48, help="calibration images per configuration")
    ap.add_argument("--top", type=int, default=6, help="stage-1 configurations carried into stage 2")
    ap.add_argument("--min-bound", type=float, default=1.3, help="stage 2 keeps configurations at least this fast")
    args = ap.parse_args(argv)
    harness.setup(args)
    if args.smoke:
        args.n, args.top, args.steps = 2, 1, args.steps or 6
    out = args.out or harness.RESULTS / f"diffusion_search_{args.model}.json"
    model = zm.load(args.model, args.smoke, args.sampler, args.steps, metrics=False)
    headline = f"{model.sampler}-{model.steps}"
    batch = args.n
    t_start = time.perf_counter()
    base = measure(model, dm.Method("baseline", "baseline", dm._none), args.n, batch, None, 0.0)
    base_imgs, base_flops = base.pop("imgs"), base["flops"]
    front = []
    lo = max(2, round(0.15 * model.steps))
    for s in tqdm(range(model.steps - 1, lo - 1, -1 if not args.smoke else -2), desc="front", leave=False):
        r = measure(model, dm.Method(f"steps={s}", "fewer-steps", dm._none, steps=s), args.n, batch, base_imgs,
                    base_flops)
        r.pop("imgs")
        front.append(r)
    pts = sorted((r["bound"], r["psnr"]) for r in front)

    def run(specs: list[str], desc: str) -> list[dict[str, Any]]:
        rows = []
        for spec in tqdm(specs, desc=desc):
            try:
                r = measure(model, dm.spec_method(model, spec, None), args.n, batch, base_imgs, base_flops)
            except (ValueError, TypeError) as err:  # a combination mmskip refuses (reported, not hidden)
                rows.append({"spec": spec, "error": f"{type(err).__name__}: {err}"})
                continue
            r.pop("imgs")
            r["margin_db"] = margin(pts, r)
            rows.append(r)
        return rows

    specs1 = stage1_specs(model)
    if args.smoke:
        specs1 = specs1[:: max(1, len(specs1) // 4)]
    stage1 = run(specs1, "stage 1")
    ok = [r for r in stage1 if r.get("margin_db") is not None and r["bound"] >= args.min_bound]
    ok.sort(key=lambda r: r["margin_db"], reverse=True)
    steps2 = sorted({round(f * model.steps) for f in (0.85, 0.7, 0.6, 0.5, 0.4)} - {model.steps}, reverse=True)
    specs2 = [with_steps(r["spec"], s, model.steps) for r in ok[: args.top] for s in steps2]
    stage2 = run(specs2, "stage 2")
    good = [r for r in stage1 + stage2 if r.get("margin_db") is not None]
    best = sorted(good, key=lambda r: r["margin_db"], reverse=True)
    res = {"model": args.model, "headline": headline, "n": args.n, "calibration": {"offset": OFFSET, "seed": SEED},
           "threads": torch.get_num_threads(), "baseline": base, "front": front, "stage1": stage1, "stage2": stage2,
           "best": best[:12], "search_s": time.perf_counter() - t_start,
           "best_by_speed": {f">={b}x": next((r for r in best if r["bound"] >= b), None) for b in (1.5, 1.8, 2.5, 3.5)}}
    lines = [f"## {args.model}: search, {len(stage1)} + {len(stage2)} configurations, {args.n} calibration images, "
             f"{res['search_s'] / 60:.0f} min", "", "| spec | FLOPs bound | PSNR dB | above front (dB) |", "|---|---|---|---|"]
    lines += [f"| {r['spec']} | {r['bound']:.2f} | {r['psnr']:.2f} | {r['margin_db']:+.2f} |" for r in best[:12]]
    lines += ["", "Front (fewer steps): " + ", ".join(f"{r['steps']}: {r['bound']:.2f}x {r['psnr']:.1f} dB" for r in front)]
    print("\n".join(lines))
    harness.write(out, res, "\n".join(lines), lambda png: plot(res, png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
