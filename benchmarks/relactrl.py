"""RelaCtrl vs the full ControlNet on the zoo's silhouette-controlled scenes-flux.

Side by side, on the same held-out prompts, silhouettes and seeds (flow Euler 28 steps, true
CFG 4): no control (the base model: how well silhouettes match by chance), the full ControlNet
(``scenes-flux-controlnet``, diffusers ``FluxControlNetModel``, a copy of every block), the same
ControlNet with its least relevant control blocks skipped at inference (RelaCtrl's relevance
used without retraining), and RelaCtrl (``scenes-flux-relactrl``). For each: control-branch
parameters, FLOPs per image and denoising step (branch, and branch + base with CFG), wall time
per step and its speedup vs the full ControlNet (``mmskip.timing.paired``: interleaved rounds, median
ratio with quartiles; FLOPs bound beside it), FID on scenes-classifier features, prompt accuracy and silhouette IoU. The full
ControlNet is rerun at other seeds to give the seed-noise band. Writes
``benchmarks/results/relactrl.json`` / ``.md`` and copies the relevance plot.

    python benchmarks/relactrl.py                   # ~15 min on 2 CPU threads
    python benchmarks/relactrl.py --timing-only --device cuda
    python benchmarks/relactrl.py --smoke           # every code path on tiny random branches, seconds
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import harness
import torch
from mmskip.diffusion.relactrl import RelaCtrlFluxNet, RelevanceReport, control_positions, skipped_control
from mmskip.diffusion.relactrl.recipe import SAMPLING, base_pipeline, evaluate_control, load_pipeline
from torch.utils.flop_counter import FlopCounterMode


def _step_inputs(pipe: Any, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tc = pipe.transformer.config
    seq_len, dim = SAMPLING["max_sequence_length"], pipe.transformer.config.joint_attention_dim
    ids = pipe._prepare_latent_image_ids(1, 8, 8, device, torch.float32)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    return {"hidden_states": r(batch, 64, tc.in_channels), "encoder_hidden_states": r(batch, seq_len, dim),
            "pooled_projections": r(batch, tc.pooled_projection_dim), "timestep": torch.full((batch,), 0.5, device=device),
            "img_ids": ids, "txt_ids": torch.zeros(seq_len, 3, device=device)}


def _step(pipe: Any, controlnet: Any, inputs: dict[str, torch.Tensor], control: torch.Tensor) -> None:
    """One denoising step as FluxControlNetPipeline runs it: the branch once, the base twice (CFG)."""
    samples: tuple[Any, Any] = (None, None)
    if controlnet is not None:
        samples = controlnet(controlnet_cond=control, return_dict=False, **inputs)
    for _ in range(2):
        pipe.transformer(controlnet_block_samples=samples[0], controlnet_single_block_samples=samples[1],
                         return_dict=False, **inputs)


def active_params(controlnet: Any, drop: list[str]) -> int:
    """Parameters of the branch that still run with the positions ``drop`` skipped."""
    skipped = {id(p) for pos in control_positions(controlnet) if pos.name in drop
               for m in (pos.block, pos.projection) for p in m.parameters()}
    return sum(p.numel() for p in controlnet.parameters() if id(p) not in skipped)


@torch.no_grad()
def cost(pipe: Any, controlnet: Any, device: torch.device, batch: int, reps: int,
         drop: list[str] = ()) -> dict[str, float]:
    """Branch parameters (those that run) and FLOPs per image per step (``reps`` > 0: and the median wall time
    of one step, a lone figure; :func:`step_timings` times the methods against each other)."""
    inputs, one = _step_inputs(pipe, batch, device), _step_inputs(pipe, 1, device)
    control = torch.randn_like(inputs["hidden_states"])
    with FlopCounterMode(display=False) as fc:
        _step(pipe, None, one, control[:1])
    base_flops = fc.get_total_flops()
    branch_flops = 0
    if controlnet is not None:
        with FlopCounterMode(display=False) as fc:
            controlnet(controlnet_cond=control[:1], return_dict=False, **one)
        branch_flops = fc.get_total_flops()
    params = active_params(controlnet, drop) if controlnet is not None else 0
    out = {"branch_params": params, "branch_gflops": branch_flops / 1e9, "step_gflops": (branch_flops + base_flops) / 1e9}
    if reps > 0:
        times = harness.repeated(lambda: _step(pipe, controlnet, inputs, control), repeats=reps, warmup=3)
        out["step_ms"] = 1e3 * statistics.median(times)
    return out


@torch.no_grad()
def step_timings(pipe: Any, methods: dict[str, tuple[Any, list[str]]], device: torch.device, batch: int,
                 reps: int, baseline: str = "full ControlNet") -> dict[str, harness.Timing]:
    """One denoising step of every method against ``baseline`` in interleaved rounds (``harness.paired``);
    each method's skipped positions are set, untimed, around each of its calls."""
    inputs = _step_inputs(pipe, batch, device)
    control = torch.randn_like(inputs["hidden_states"])

    def timed(cn: Any, drop: list[str]) -> harness.Candidate:
        held: dict[str, Any] = {}

        def setup() -> None:
            held["cm"] = skipped_control(cn, drop) if cn is not None else nullcontext()
            held["cm"].__enter__()

        return harness.Candidate(lambda: _step(pipe, cn, inputs, control), setup,
                                 lambda: held.pop("cm").__exit__(None, None, None))

    calls = {name: timed(cn, drop) for name, (cn, drop) in methods.items()}
    return harness.paired(calls.pop(baseline), calls, repeats=max(reps, 3), warmup=3)


def _methods(args: argparse.Namespace, pipe: Any) -> tuple[dict[str, tuple[Any, list[str]]], RelevanceReport]:
    full = load_pipeline(args.controlnet, base=pipe).controlnet
    rela = load_pipeline(args.relactrl, base=pipe).controlnet
    report = RelevanceReport.load(Path(args.controlnet) / "relevance.json")
    drop = report.least_relevant(len(report.positions) - len(rela.config.positions))
    return {"no control (base)": (None, []), "full ControlNet": (full, []),
            f"full, skip {len(drop)} least relevant": (full, drop), "RelaCtrl": (rela, [])}, report


def _evaluate(pipe: Any, controlnet: Any, drop: list[str], n: int, seed: int, batch: int) -> dict[str, float]:
    from diffusers import FluxControlNetPipeline

    if controlnet is None:  # the base model, with a branch whose every position is skipped
        return {}
    cpipe = FluxControlNetPipeline(**pipe.components, controlnet=controlnet)
    cpipe.set_progress_bar_config(disable=True)
    with skipped_control(controlnet, drop):
        return evaluate_control(cpipe, n=n, seed=seed, batch_size=batch)


def _base_quality(pipe: Any, controlnet: Any, n: int, seed: int, batch: int) -> dict[str, float]:
    """The base model without control: every control position of the full branch skipped (the
    residuals are exact zeros, so the base's images)."""
    return _evaluate(pipe, controlnet, [p.name for p in control_positions(controlnet)], n, seed, batch)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    pipe = base_pipeline(Path(args.controlnet), device)
    methods, report = _methods(args, pipe)
    for _, (cn, _) in methods.items():
        if cn is not None:
            cn.to(device)
    rows = []
    full_cost = None
    for name, (cn, drop) in methods.items():
        with skipped_control(cn, drop) if cn is not None else nullcontext():
            row = {"method": name, **cost(pipe, cn, device, args.batch, 0, drop)}
        if name == "full ControlNet":
            full_cost = row
        rows.append(row)
    timings = step_timings(pipe, methods, device, args.batch, args.repeats)
    full_t = next(iter(timings.values()))
    for row in rows:
        t = timings.get(row["method"])
        row["params_vs_full"] = row["branch_params"] / full_cost["branch_params"]
        row["branch_flops_vs_full"] = row["branch_gflops"] / full_cost["branch_gflops"]
        row["step_ms"] = 1e3 * (t.seconds if t else full_t.baseline_seconds)
        row["step_times_s"] = list(t.candidate_s if t else full_t.baseline_s)
        row["step_speedup_vs_full"] = t.speedup if t else 1.0
        row["step_speedup_spread"] = list(t.spread) if t else [1.0, 1.0]
        row["step_flops_bound_vs_full"] = full_cost["step_gflops"] / row["step_gflops"]
        row["bound_warning"] = t.bound_warning(row["step_gflops"] / full_cost["step_gflops"]) if t else None
    band = {}
    if not args.timing_only:
        full = methods["full ControlNet"][0]
        for row in rows:
            cn, drop = methods[row["method"]]
            t0 = time.perf_counter()
            q = (_base_quality(pipe, full, args.n, 0, args.eval_batch) if cn is None
                 else _evaluate(pipe, cn, drop, args.n, 0, args.eval_batch))
            row.update(q)
            print(f"  {row['method']}: {q} ({time.perf_counter() - t0:.0f} s)", flush=True)
        for seed in args.band_seeds:
            band[seed] = _evaluate(pipe, full, [], args.n, seed, args.eval_batch)
            print(f"  full ControlNet, seed {seed}: {band[seed]}", flush=True)
    return {"device": str(device), "batch": args.batch, "n": args.n, "sampling": SAMPLING,
            "relevance": report.to_dict(), "rows": rows, "full_controlnet_seed_band": band,
            "threads": torch.get_num_threads()}



def table(result: dict[str, Any]) -> str:
    keys = ("FID", "prompt accuracy (exact)", "silhouette IoU")
    lines = [f"device {result['device']}, step timed at batch {result['batch']}, quality on n={result['n']} "
             f"held-out scenes (flow Euler 28, true CFG 4)", "",
             "| method | branch params (run) | vs full | branch GFLOPs/img·step | vs full | step GFLOPs (branch + base×2) "
             "| step ms | speed vs full | FID | prompt acc | silhouette IoU |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        q = [f"{r[k]:.3f}" if k in r else "—" for k in keys]
        lines.append(f"| {r['method']} | {r['branch_params']:,} | {r['params_vs_full']:.3f} | {r['branch_gflops']:.4f} | "
                     f"{r['branch_flops_vs_full']:.3f} | {r['step_gflops']:.4f} | {r['step_ms']:.2f} | "
                     f"{r['step_speedup_vs_full']:.2f}× | {' | '.join(q)} |")
    band = result["full_controlnet_seed_band"]
    if band:
        full = next(r for r in result["rows"] if r["method"] == "full ControlNet")
        for k in keys:
            vals = [full[k], *[b[k] for b in band.values()]]
            lines.append(f"\nSeed band of the full ControlNet ({len(vals)} seeds), {k}: {min(vals):.3f} – {max(vals):.3f}")
    rel = result["relevance"]
    lines.append("\nRelevance (full ControlNet): " + ", ".join(
        f"{p} {s:.2f}" for p, s in zip(rel["positions"], rel["scores"], strict=True)))
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from mmskip.zoo import MODELS_DIR

    p = harness.arguments(__doc__, repeats=30, threads=2, out=harness.RESULTS / "relactrl", device=True,
                          smoke="tiny random branches in a temporary folder")
    p.add_argument("--reps", dest="repeats", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # the option's former name
    p.add_argument("--controlnet", default=str(MODELS_DIR / "scenes-flux-controlnet"))
    p.add_argument("--relactrl", default=str(MODELS_DIR / "scenes-flux-relactrl"))
    p.add_argument("--n", type=int, default=300, help="held-out scenes per quality measurement")
    p.add_argument("--band-seeds", type=int, nargs="*", default=[1000, 2000])
    p.add_argument("--batch", type=int, default=8, help="batch of the timed step")
    p.add_argument("--eval-batch", type=int, default=100)
    p.add_argument("--timing-only", action="store_true", help="parameters, FLOPs and step times only")
    return p.parse_args(argv)


def _smoke_models(folder: Path) -> tuple[str, str]:
    """Untrained branches for scenes-flux (projections randomised so they act) and a made-up relevance."""
    from diffusers import FluxControlNetModel, FluxPipeline

    from mmskip.zoo import path

    base = FluxPipeline.from_pretrained(path("scenes-flux"))
    c = base.transformer.config
    full = FluxControlNetModel.from_transformer(base.transformer, num_layers=c.num_layers,
                                               num_single_layers=c.num_single_layers,
                                               attention_head_dim=c.attention_head_dim,
                                               num_attention_heads=c.num_attention_heads)
    rela = RelaCtrlFluxNet.from_transformer(base.transformer, (0, 2, 3), (4.0, 2.0, 1.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for net in (full, rela):
            for name, p in net.named_parameters():
                if "controlnet" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    full.save_pretrained(folder / "cn")
    rela.save_pretrained(folder / "rc")
    names = [f"double.{i}" for i in range(c.num_layers)] + [f"single.{i}" for i in range(c.num_single_layers)]
    RelevanceReport(names, list(range(len(names))), [1.0 + i for i in range(len(names))], [0.5] * len(names),
                    {"quality_loss": 1.0, "fidelity": 0.5}, 1.0).save(folder / "cn" / "relevance.json")
    return str(folder / "cn"), str(folder / "rc")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    harness.setup(args)
    tmp = None
    if args.smoke:
        import tempfile

        tmp = tempfile.TemporaryDirectory()
        args.controlnet, args.relactrl = _smoke_models(Path(tmp.name))
        args.n, args.band_seeds, args.repeats, args.eval_batch = 4, [1], 2, 4
        SAMPLING["num_inference_steps"] = 2
        args.out = str(Path(tmp.name) / "relactrl")
    try:
        for folder in (args.controlnet, args.relactrl):
            if not (Path(folder) / "config.json").is_file():
                raise SystemExit(f"no control branch in {folder}; train it with `mmskip zoo "
                                 f"{Path(folder).name}` or pass --controlnet/--relactrl")
        result = run(args)
        text = table(result)
        print(text)
        out = Path(args.out)
        harness.write(out.with_suffix(".json"), result, text)
        plot = Path(args.controlnet) / "relevance.png"
        if plot.is_file() and not (args.smoke or args.timing_only):
            shutil.copy(plot, out.with_name(out.name + "_relevance.png"))
        return result
    finally:
        if args.smoke:
            SAMPLING["num_inference_steps"] = 28
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
