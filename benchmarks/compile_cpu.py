"""torch.compile (inductor, CPU) with mmskip's feature inheritance on a drop-in pipeline.

``SkipStableDiffusionPipeline`` on the zoo's ``digits-sd`` (UNet 1.8M, 8x8 latents, DDIM, CFG
batched), CPU. For the denoiser eager and ``pipe.unet.compile()`` (inductor), with skipping off
and with ``FeatureInheritanceConfig`` (DeepCache-shaped split every 3 steps): compile seconds
(first call minus a steady call), steady seconds per call (median of ``--repeats`` rounds in which
all four settings run interleaved, ``mmskip.timing.paired``; speedups are median paired ratios with
their quartiles), dynamo
graphs compiled (must not grow with the number of steps or calls) and fidelity to the eager
output of the same setting. Writes ``benchmarks/results/compile_cpu.json`` and prints a table.

    python benchmarks/compile_cpu.py [--steps 25] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import statistics

import harness
import torch


def _pipe():
    from mmskip.pipelines import SkipStableDiffusionPipeline

    from mmskip import zoo

    pipe = SkipStableDiffusionPipeline.from_pretrained(zoo.path("digits-sd"), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe, steps: int) -> torch.Tensor:
    return pipe(["a handwritten digit three", "a handwritten digit seven"], num_inference_steps=steps,
                generator=torch.Generator().manual_seed(0), output_type="pt").images


def _timed(pipe, steps: int) -> tuple[float, torch.Tensor]:
    """Seconds and images of one call (the first call of a compiled pipeline includes its compilation)."""
    return harness.once(lambda: _call(pipe, steps))


def run(steps: int, repeats: int) -> list[dict]:
    """Build the four settings (each compiled one compiles and is counted on its own), then time all of them
    in the same interleaved rounds (``harness.paired``) against the eager baseline."""
    from mmskip.diffusion import FeatureInheritanceConfig
    from torch._dynamo.utils import counters

    from mmskip.schedules import interval

    rows, pipes = [], {}
    deepcache = FeatureInheritanceConfig(interval(3))  # default targets: every block but the outermost two
    torch._dynamo.reset()
    for name, cfg in (("baseline", None), ("mmskip FI DeepCache-shape every 3", deepcache)):
        ref = None
        for compiled in (False, True):
            pipe = _pipe()
            if cfg is not None:
                pipe.enable_skip(cfg)
            graphs = {"n": 0}
            if compiled:
                counters.clear()  # the other pipes' graphs are compiled already: what is new here is this one's
                pipe.unet.compile()
            first, out = _timed(pipe, steps)
            if compiled:
                graphs["n"] = int(counters["stats"]["unique_graphs"])
                _timed(pipe, steps + 5)  # other timesteps and step count: no new graphs
                graphs["after_other_steps"] = int(counters["stats"]["unique_graphs"])
            if ref is None:
                ref = out
            pipes[(name, compiled)] = pipe
            rows.append({
                "method": name, "compiled": compiled, "first_call_s": first,
                "graphs": graphs.get("n"), "graphs_after_other_steps": graphs.get("after_other_steps"),
                "max_abs_diff_vs_eager": float((out - ref).abs().max()),
                "flops_fraction": pipe.skip_stats().get("flops_fraction") if cfg is not None else 1.0,
            })
    key = [(r["method"], r["compiled"]) for r in rows]
    calls = {k: (lambda p=pipes[k]: _call(p, steps)) for k in key}
    base_key = ("baseline", False)
    timings = harness.paired(calls.pop(base_key), calls, repeats=repeats)
    secs = {base_key: next(iter(timings.values())).baseline_s, **{k: t.candidate_s for k, t in timings.items()}}
    for r, k in zip(rows, key):
        steady = statistics.median(secs[k])
        vs_eager = harness.Timing(secs[base_key], secs[k])  # the same rounds: paired
        vs_same = harness.Timing(secs[("baseline", r["compiled"])], secs[k])
        r.update({"steady_s": steady, "compile_s": max(r["first_call_s"] - steady, 0.0) if r["compiled"] else None,
                  "times_s": list(secs[k]), "speedup_vs_eager_baseline": vs_eager.speedup,
                  "speedup_vs_eager_baseline_spread": list(vs_eager.spread),
                  "speedup_vs_same_compile_baseline": vs_same.speedup,
                  "speedup_vs_same_compile_baseline_spread": list(vs_same.spread), "pairs": vs_eager.pairs,
                  "bound_warning": vs_same.bound_warning(r["flops_fraction"])})
        print(f"{r['method']:36s} compiled={r['compiled']!s:5s} steady {steady:.3f}s first {r['first_call_s']:.2f}s "
              f"graphs {r['graphs']} -> {r['graphs_after_other_steps']} diff {r['max_abs_diff_vs_eager']:.2e}",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = harness.arguments(__doc__, smoke="5 steps, 3 repeats: checks the script runs (numbers meaningless)")
    p.add_argument("--steps", type=int, default=25)
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.repeats = 5, 3
    harness.setup(args)
    rows = run(args.steps, args.repeats)
    text = harness.table(
        ["method", "compiled", "s / call", "vs eager baseline", "vs baseline, same compile", "compile s",
         "graphs (then after other steps)", "FLOPs bound (denoiser)", "max diff vs eager"],
        [[r["method"], r["compiled"], f"{r['steady_s']:.3f}", f"{r['speedup_vs_eager_baseline']:.2f}x",
          f"{r['speedup_vs_same_compile_baseline']:.2f}x", "—" if r["compile_s"] is None else f"{r['compile_s']:.1f}",
          f"{r['graphs']} ({r['graphs_after_other_steps']})", f"{1 / r['flops_fraction']:.2f}x",
          f"{r['max_abs_diff_vs_eager']:.1e}"] for r in rows])
    print("\n" + text)
    meta = {"torch": torch.__version__, "threads": args.threads, "steps": args.steps, "device": "cpu"}
    out = args.out or harness.RESULTS / ("compile_cpu_smoke.json" if args.smoke else "compile_cpu.json")
    harness.write(out, {"meta": meta, "rows": rows}, text, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
