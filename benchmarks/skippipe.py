"""SkipPipe vs the full pipeline: CPU processes on this machine (gloo, torchrun), same wall time each.

Runs (each a torchrun job of 5-6 processes, one thread each, training a Llama on the zoo's
Python-stdlib text with ``stdlib-lm``'s tokenizer, for the same wall-clock budget):

* 5 stages x 1 pipeline (stage 0: embedding + head; 4 middle stages of 2 layers), homogeneous:
  full pipeline, SkipPipe at skip ratio 0.25 and 0.5;
* the same with simulated heterogeneity (two middle nodes 2x slower): full vs SkipPipe 0.5;
* 3 stages x 2 pipelines (6 processes) with one slow node (3x): the full data- and pipeline-parallel
  baseline (fixed pipelines) vs SkipPipe 0.25 with cross-replica routing.

For each: iterations done, median iteration time and its ratio to the full pipeline, the planned
(scheduler) ratio beside it, training loss, held-out perplexity with every stage and with half of
the middle stages skipped. Then a paper-scale estimate from the measured per-stage costs (a model,
not a measurement). Writes ``benchmarks/results/skippipe.json`` / ``.md`` / ``skippipe_loss.png``.

    python benchmarks/skippipe.py                   # ~20 min on 2 CPU cores
    python benchmarks/skippipe.py --groups "5 stages" --seconds 50 --out benchmarks/results/skippipe_16cpu
                                                    # the uncontended run (16 cores, one per process)
    python benchmarks/skippipe.py --smoke           # tiny model, synthetic data, seconds per run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import harness
import torch

from mmskip.train.skippipe import SkipPipeConfig, StageCosts, TrainSpec, launch, plan, split
from mmskip.train.skippipe.runtime import _model


def measure_costs(spec: TrainSpec, stages: int, vocab: int, reps: int = 3) -> StageCosts:
    """Seconds per microbatch of each operation kind, timed in this process (one thread)."""
    torch.set_num_threads(1)
    parts = split(_model(spec, vocab), stages)
    ids = torch.randint(0, vocab, (spec.microbatch, spec.seq))

    def timed(fn) -> float:
        return statistics.mean(harness.repeated(fn, repeats=reps, warmup=1))

    h = parts[0].embed(ids).detach()

    def head() -> None:
        x = h.clone().requires_grad_()
        parts[0].loss(x, ids).backward()

    def mid_fwd() -> None:
        with torch.no_grad():
            parts[1](h)

    def mid_both() -> None:
        x = h.clone().requires_grad_()
        y = parts[1](x)
        y.backward(torch.ones_like(y))

    def embed_both() -> None:
        e = parts[0].embed(ids)
        e.backward(torch.ones_like(e))

    fwd, both, emb = timed(mid_fwd), timed(mid_both), timed(embed_both)
    comm = h.numel() * 4 / 1e9  # ~1 GB/s through localhost sockets
    return StageCosts(embed=emb / 3, head=timed(head), embed_bwd=2 * emb / 3, fwd=fwd, bwd=max(both - fwd, fwd),
                      comm=comm)


def runs(smoke: bool) -> list[tuple[str, str, SkipPipeConfig]]:
    """(group, label, config) of every job."""
    mb = 4 if smoke else 8
    s5 = SkipPipeConfig(stages=5, microbatches=mb, trials=32)
    slow5 = (1.0, 1.0, 2.0, 1.0, 2.0)
    s3 = SkipPipeConfig(stages=3, replicas=2, microbatches=mb // 2, trials=32, cross_replica=False)
    slow3 = (1.0, 1.0, 1.0, 1.0, 3.0, 1.0)
    out = [("5 stages", "full pipeline", s5),
           ("5 stages", "SkipPipe 0.25", replace(s5, skip_ratio=0.25)),
           ("5 stages", "SkipPipe 0.5", replace(s5, skip_ratio=0.5)),
           ("5 stages, 2 slow nodes", "full pipeline", replace(s5, speed=slow5)),
           ("5 stages, 2 slow nodes", "SkipPipe 0.5", replace(s5, speed=slow5, skip_ratio=0.5)),
           ("3 stages x 2 pipelines, 1 slow node", "full (fixed pipelines)", replace(s3, speed=slow3)),
           ("3 stages x 2 pipelines, 1 slow node", "SkipPipe 0.25 (routed)",
            replace(s3, speed=slow3, skip_ratio=0.25, cross_replica=True))]
    if smoke:  # two short jobs on 3 stages: every code path, a minute
        s3s = SkipPipeConfig(stages=3, microbatches=mb, trials=4)
        return [("3 stages", "full pipeline", s3s), ("3 stages", "SkipPipe 0.5", replace(s3s, skip_ratio=0.5))]
    return out


def paper_estimate(costs: StageCosts, spec: TrainSpec) -> list[dict[str, Any]]:
    """Planned iteration time of SkipPipe vs the full pipeline at the paper's scales: a model.

    Per-layer cost scales with width² (measured here at ``spec.width``); the head with width x vocab;
    sends with activation size over a 1 Gbit/s link. 20 nodes (the paper: 6 stages, 5 replicas of stage 0, 3 of
    the others in the authors' default layout; here 5 stages x 4 pipelines, since every stage has the same
    number of replicas), half the nodes of each middle stage 2x slower.
    """
    out = []
    layers_here = spec.layers / 4  # measured per middle stage of the 5-stage split
    for name, width, layers, vocab in (("LLaMa-500M", 1280, 24, 32000), ("LLaMa-1.5B", 2048, 24, 32000),
                                       ("LLaMa-8B", 4096, 32, 128256)):
        scale = (width / spec.width) ** 2
        per_layer_f, per_layer_b = costs.fwd / layers_here * scale, costs.bwd / layers_here * scale
        head = costs.head * (width * vocab) / (spec.width * 4096)
        comm = spec.microbatch * spec.seq * width * 2 / (1e9 / 8)  # bf16 over 1 Gbit/s
        per_stage = layers / 4
        c = StageCosts(embed=costs.embed, head=head, embed_bwd=costs.embed_bwd, fwd=per_layer_f * per_stage,
                       bwd=per_layer_b * per_stage, comm=comm)
        speed = tuple(2.0 if (s > 0 and r % 2) else 1.0 for r in range(4) for s in range(5))
        base = SkipPipeConfig(stages=5, replicas=4, microbatches=6, speed=speed, trials=8, cross_replica=False)
        full = plan(base, c).makespan
        for ratio in (0.25, 0.5):
            sp = plan(replace(base, skip_ratio=ratio, cross_replica=True), c).makespan
            out.append({"model": name, "skip_ratio": ratio, "full_s": full, "skippipe_s": sp,
                        "iteration_time_saved": 1 - sp / full})
    return out


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    spec = TrainSpec(layers=args.layers, width=args.width, seq=args.seq, microbatch=args.microbatch,
                     iterations=100000, time_limit_s=args.seconds, lr=args.lr, eval_windows=args.eval_windows,
                     data=args.data, vocab=64)
    vocab = 64 if args.data == "synthetic" else 4096
    costs = measure_costs(spec, 5, vocab)
    print(f"measured costs per microbatch (s): {costs}", flush=True)
    rows = []
    measured = {5: costs}  # one cost measurement per stage count: every run of a setting plans with the same
    for group, label, cfg in [r for r in runs(args.smoke) if args.groups is None or r[0] in args.groups]:
        stages = cfg.stages
        if stages not in measured:
            measured[stages] = measure_costs(spec, stages, vocab)
        c = measured[stages]
        cfg = replace(cfg, costs=(c.embed, c.head, c.embed_bwd, c.fwd, c.bwd, c.comm))
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            rec = launch(cfg, replace(spec, out=tmp), timeout_s=args.seconds * 4 + 300)
            wall = time.perf_counter() - t0
        secs = [h["seconds"] for h in rec["history"][1:]] or [rec["history"][0]["seconds"]]
        row = {"group": group, "method": label, "processes": cfg.world_size, "skip_ratio": cfg.skip_ratio,
               "speed": cfg.speed, "iterations": rec["iterations"], "iteration_s": statistics.median(secs),
               "planned_makespan_s": rec["planned_makespan"], "skip_counts": rec["skip_counts"], "final_loss": statistics.mean(
                   h["loss"] for h in rec["history"][-10:]), "val_ppl_full": rec.get("val_ppl_full"),
               "val_ppl_half": rec.get("val_ppl_half"), "job_wall_s": wall, "history": rec["history"]}
        rows.append(row)
        print(f"  {group} / {label}: {row['iterations']} it, {row['iteration_s']:.3f} s/it, loss "
              f"{row['final_loss']:.3f}, ppl {row['val_ppl_full']:.2f} (half {row['val_ppl_half']:.2f})", flush=True)
    derive(rows)
    return {"spec": {k: v for k, v in spec.__dict__.items() if k != "out"}, "seconds_per_run": args.seconds,
            "costs": costs.__dict__, "rows": rows, "paper_estimate": paper_estimate(costs, spec)}


def derive(rows: list[dict[str, Any]]) -> None:
    """Ratios to each setting's full pipeline, and the training loss at equal iterations (the mean of
    the 10 iterations up to the full pipeline's last one, where the run got that far)."""
    for row in rows:
        base = next(r for r in rows if r["group"] == row["group"] and r["skip_ratio"] == 0)
        row["iteration_time_saved"] = 1 - row["iteration_s"] / base["iteration_s"]
        row["planned_time_saved"] = 1 - row["planned_makespan_s"] / base["planned_makespan_s"]
        row["ppl_vs_full"] = row["val_ppl_full"] / base["val_ppl_full"] - 1
        row["half_gap"] = row["val_ppl_half"] / row["val_ppl_full"] - 1
        n = base["iterations"]
        window = [h["loss"] for h in row["history"][max(0, n - 10):n]]
        row["loss_at_full_iterations"] = statistics.mean(window) if len(row["history"]) >= n else None


def table(result: dict[str, Any]) -> str:
    s = result["spec"]
    lines = [f"Llama {s['layers']} x {s['width']}, seq {s['seq']}, microbatch {s['microbatch']}, data {s['data']}; "
             f"each run trains for {result['seconds_per_run']} s of wall time on this machine.", "",
             "| setting | method | processes | iterations | s / iteration | time saved (planned) | train loss "
             "| train loss at the full run's iterations | val ppl | vs full | ppl, half the stages | half-model gap |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['group']} | {r['method']} | {r['processes']} | {r['iterations']} | {r['iteration_s']:.3f} | "
                     f"{100 * r['iteration_time_saved']:.0f} % ({100 * r['planned_time_saved']:.0f} %) | "
                     f"{r['final_loss']:.3f} | "
                     f"{'—' if r.get('loss_at_full_iterations') is None else format(r['loss_at_full_iterations'], '.3f')} | "
                     f"{r['val_ppl_full']:.2f} | {100 * r['ppl_vs_full']:+.1f} % | "
                     f"{r['val_ppl_half']:.2f} | {100 * r['half_gap']:+.0f} % |")
    lines += ["", "Paper-scale estimate (a model from the measured per-stage costs, not a measurement): 20 nodes, "
              "5 stages x 4 pipelines, half of each middle stage's nodes 2x slower, 1 Gbit/s links.", "",
              "| model | skip ratio | full pipeline (s, planned) | SkipPipe (s, planned) | iteration time saved |",
              "|---|---|---|---|---|"]
    for e in result["paper_estimate"]:
        lines.append(f"| {e['model']} | {e['skip_ratio']} | {e['full_s']:.2f} | {e['skippipe_s']:.2f} | "
                     f"{100 * e['iteration_time_saved']:.0f} % |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(r["group"] for r in result["rows"]))
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.6), squeeze=False)
    for ax, g in zip(axes[0], groups, strict=True):
        for r in (r for r in result["rows"] if r["group"] == g):
            t = [sum(h["seconds"] for h in r["history"][: i + 1]) for i in range(len(r["history"]))]
            ax.plot(t, [h["loss"] for h in r["history"]], label=f"{r['method']} ({r['iteration_s']:.2f} s/it)")
        ax.set_title(g, fontsize=9)
        ax.set_xlabel("training wall time (s)")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = harness.arguments(__doc__, repeats=None, threads=None, out=harness.RESULTS / "skippipe",
                          smoke="tiny model, synthetic data, a few seconds per run")
    p.add_argument("--seconds", type=float, default=120.0, help="training wall time of each run")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--microbatch", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-windows", type=int, default=128)
    p.add_argument("--data", default="stdlib", choices=["stdlib", "synthetic"])
    p.add_argument("--groups", nargs="+", help="run only these settings (e.g. \"5 stages\")")
    p.add_argument("--rederive", action="store_true", help="recompute the ratios, table and plot of OUT.json")
    args = p.parse_args(argv)
    if args.smoke:
        args.seconds, args.layers, args.width, args.seq, args.data, args.eval_windows = 3.0, 4, 64, 32, "synthetic", 8
        args.out = Path(tempfile.mkdtemp()) / "skippipe"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.rederive:
        result = json.loads(Path(args.out).with_suffix(".json").read_text())
        derive(result["rows"])
    else:
        result = run_all(args)
    text = table(result)
    print(text)
    out = Path(args.out)
    harness.write(out.with_suffix(".json"), result, text, lambda png: plot(result, png), out.with_name(out.name + "_loss.png"))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
