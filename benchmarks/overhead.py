"""What each skipping technique costs when it skips nothing, and what it gives at its default, eager.

For every technique on its zoo model (``mmskip.tune``'s target for that model: its stock inputs,
its runs, its quality metric):

1. **Zero-skip overhead**: the technique applied with a config that skips nothing (an empty skip
   set, a threshold that never fires, keep ratio 1.0, inheritance that recomputes every step),
   timed against the unmodified model with :func:`mmskip.timing.paired` (interleaved, warm-up
   dropped, median and quartiles of the paired ratios); overhead % = 1 / speedup - 1. That the
   config really skips nothing is checked, not assumed: its FLOPs fraction
   (``torch.utils.flop_counter``) must be 1.0 and its outputs must equal the baseline's; both are
   recorded, and the table flags a zero config that fails either.
2. **Default config**: the first seed of the technique's declared ``search_space`` (with the
   target's settings, steps and sampler, left at the baseline's) or, without seeds, the config's
   defaults: paired speedup, FLOPs bound (1 / FLOPs fraction, counted with
   ``torch.utils.flop_counter`` over every timed input, prompts included) and speedup / bound.
   A speedup above the bound is possible and flagged: FLOPs are not time. Decode-phase skipping
   is the usual case: the prompt's one batched forward holds most of the FLOPs and little of
   the time, while the per-token decode steps it skips hold most of the time.
3. **Quality** at the default: the target's own metric (greedy agreement for LMs, PSNR for
   pipelines, answer agreement for VLMs and Florence-2).

Each technique's zero and default configs are timed in the same interleaved rounds, together with a
null pair (the baseline timed against itself the same way, e.g. on the model copy ``timing_pair``
makes), whose ratio shows the pairing's own bias and noise.

    python benchmarks/overhead.py --models stdlib-lm --repeats 15
    python benchmarks/overhead.py --techniques feature_inheritance,step_skip
    python benchmarks/overhead.py --smoke
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness
import torch
from _compiled_pairs import compile_in_place, compiled_pair, eager_stance, graphs_compiled
from torch.utils.flop_counter import FlopCounterMode
from tune import STEPS, headline_target  # the zoo models at the pipeline benchmarks' headline settings

from mmskip.tuning.cli import stock_inputs
from mmskip.tuning.space import Candidate

INPUTS = {"lm": 8, "pipeline": 4, "vlm": 32, "encoder_decoder": 8}  # stock inputs per run, by target kind


def _layer_skip_zero(target: Any) -> Any:
    from mmskip import LayerSkipConfig, schedules

    return LayerSkipConfig(schedule=schedules.explicit(skip=()))


def _ffn_skip_zero(target: Any) -> Any:
    from mmskip import FFNSkipConfig
    from mmskip.schedules import AdaptiveSchedule

    return FFNSkipConfig(schedule=AdaptiveSchedule(threshold=2.0, signal="cosine", warmup=4, max_skip=0.25))


def _void_zero(target: Any) -> Any:
    from mmskip import VoidLayerConfig
    from mmskip.schedules import AdaptiveSchedule

    # alpha 0 is no zero config: LAC's progress ||h_l|| - ||h_l-1|| is negative where a layer shrinks the
    # residual norm, so such a layer is void at any alpha (measured: 2 of 8 stock prompts skipped two layers)
    return VoidLayerConfig(schedule=AdaptiveSchedule(threshold=0.5, signal="l2_change", max_skip=0.0))


def _inheritance_zero(target: Any) -> Any:
    from mmskip.diffusion import FeatureInheritanceConfig

    from mmskip.schedules import interval

    return FeatureInheritanceConfig(schedule=interval(1), measure_flops=False)


def _step_skip_zero(target: Any) -> Any:
    from mmskip.diffusion import StepSkipConfig

    from mmskip.schedules import interval

    return StepSkipConfig(schedule=interval(1))


def _teleport_zero(target: Any) -> Any:
    from mmskip.diffusion import GaussianTeleportConfig

    return GaussianTeleportConfig(stats_path=str(target.gaussian_stats), skip_fraction=0.0)


def _mod_zero(cls_name: str) -> Callable[[Any], Any]:
    def build(target: Any) -> Any:
        import mmskip.vision as vision

        from mmskip.schedules import ConstantSchedule

        return getattr(vision, cls_name)(schedule=ConstantSchedule(ratio=1.0))
    return build


def _mue_zero(target: Any) -> Any:
    from mmskip.vision import MuEConfig

    return MuEConfig(image_threshold=1.0, text_threshold=1.0, decoder_threshold=1.0, decay=1.0, floor=1.0)


@dataclass(frozen=True)
class Technique:
    """One technique: its id, the zoo models it is measured on, its zero-skip config (``None``: it has
    none) and what that config is, or why it is not measured."""

    name: str
    models: tuple[str, ...]
    zero: Callable[[Any], Any] | None
    zero_note: str = ""
    not_measured: str | None = None


LM, PIPES = ("stdlib-lm",), ("digits-dit", "digits-sd")
TECHNIQUES = (
    Technique("layer_skip", LM, _layer_skip_zero, "explicit(skip=()): no layer skipped"),
    Technique("ffn_skip", LM, _ffn_skip_zero, "cosine threshold 2.0: can skip nothing, so no FFN is hooked"),
    Technique("void_layers", LM, _void_zero, "skip cap 0: prompts traced (one LAC hook a layer), no skip hook"),
    Technique("first_routers", LM, None, not_measured="no trained routers ship in the zoo"),
    Technique("self_speculative", ("stdlib-lm-skip",), None, "none (SWIFT always drafts)"),
    Technique("feature_inheritance", PIPES, _inheritance_zero, "interval(1): every step recomputes"),
    Technique("step_skip", PIPES, _step_skip_zero, "interval(1): every grid step visited"),
    Technique("gaussian_teleport", PIPES, _teleport_zero, "skip_fraction 0: no step jumped"),
    Technique("pmod", ("digits-llava",), _mod_zero("MoDConfig"), "constant keep ratio 1.0"),
    Technique("videomod", ("digits-video",), _mod_zero("VideoMoDConfig"), "constant keep ratio 1.0"),
    Technique("mue", ("digits-florence",), _mue_zero, "every threshold 1.0, no decay: never exits"),
)


def same(a: Any, b: Any) -> bool:
    """Whether two outputs are exactly equal (tensors element for element, containers item for item)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def _cpu(x: Any) -> Any:
    """``x`` with its tensors on the CPU (containers item for item)."""
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, dict):
        return {k: _cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_cpu(v) for v in x)
    return x


def default_config(target: Any, name: str) -> tuple[Any, str]:
    """The technique's default on ``target`` and a label: its space's first seed (target settings
    dropped, so the baseline's steps and sampler stay), else the config class's defaults."""
    from mmskip.inject import SkipConfig

    space = next((s for s in target.spaces() if s.technique == name), None)
    if space is not None and space.seeds:
        values = {k: v for k, v in space.seeds[0].items() if k in space.params}
        # built at the baseline's settings (a sampler-level technique plans the baseline's sampler)
        return space.build({**target.baseline().settings, **values}), "seed: " + " ".join(f"{k}={v}" for k, v in values.items())
    cls = next(c for c in SkipConfig.registered() if c.technique == name)
    if name == "gaussian_teleport":
        return cls(stats_path=str(target.gaussian_stats)), "defaults (skip_fraction 0.2)"
    return cls(), "config defaults"


def model_target(name: str, args: Any) -> tuple[Any, list[Any]]:
    """The tuning target of zoo model ``name`` and its stock inputs (checked as the tuner checks them)."""
    target = headline_target(name, args.steps)
    if target.kind == "lm":  # VLMs and Florence-2 keep their targets' answer lengths
        target.max_new_tokens = args.max_new_tokens
    n = args.inputs or INPUTS.get(target.kind, 4)
    return target, target.check_inputs(stock_inputs(name, target, n), "inputs")


def counted_run(target: Any, candidate: Candidate, inputs: list[Any]) -> tuple[Any, float, float]:
    """Outputs of ``candidate`` on every input, their FLOPs (``torch.utils.flop_counter``) and the
    seconds of that counted run (a flop counter slows every op: not a timing). Counted on a second
    run, as the timing drops its warm-up: what a technique does once per model (SWIFT's layer-set
    search) is then in neither."""
    with eager_stance(target), target.applied(candidate):
        target.run(inputs)
        t0 = time.perf_counter()
        with FlopCounterMode(display=False) as counter:
            out = target.run(inputs)
        return out, float(counter.get_total_flops()), time.perf_counter() - t0


def measure(tech: Technique, name: str, target: Any, inputs: list[Any], ref: Any, base_flops: float,
            repeats: int, backend: str | None = None) -> dict[str, Any]:
    """One row: the zero config's checks and overhead, the default's speedup, bound and quality
    (timed compiled, with ``backend``, when one is given)."""
    t0 = time.perf_counter()
    row: dict[str, Any] = {"technique": tech.name, "model": name, "metric": target.metric, "status": "measured"}
    if backend is not None and tech.name == "self_speculative":
        return {**row, "status": "not measured compiled: each layer set SWIFT's search tries is Python state the "
                                 "compiled forward guards on, so the search recompiles the model per trial"}
    if tech.name == "gaussian_teleport" and not getattr(target, "gaussian_stats", None):
        return {**row, "status": "not measured: no Gaussian stats (run benchmarks/diffusion.py to write them)"}
    settings = dict(target.baseline().settings)
    timed: dict[str, Candidate] = {"null": target.baseline()}
    if tech.zero is not None:
        zero = tech.zero(target)
        timed["zero"] = Candidate(configs=(zero,), settings=settings, label=f"{tech.name} zero")
        out, flops, _ = counted_run(target, timed["zero"], inputs)
        frac = flops / base_flops
        equal = same(out, ref)
        row.update(zero_config=zero.to_dict(), zero_note=tech.zero_note, zero_flops_fraction=frac,
                   zero_outputs_equal=equal, zero_quality=target.quality(out, ref),
                   zero_skips_nothing=abs(frac - 1.0) < 1e-9 and equal)
    else:
        row.update(zero_config=None, zero_note=tech.zero_note)
    default, label = default_config(target, tech.name)
    timed["default"] = Candidate(configs=(default,), settings=settings, label=label)
    out, flops, _ = counted_run(target, timed["default"], inputs)
    frac = flops / base_flops
    row.update(default_config=default.to_dict(), default_label=label, flops_fraction=frac,
               flops_bound=1.0 / frac if frac > 0 else None, quality=target.quality(out, ref))
    static = target.kind == "lm"
    if backend is not None and target.kind != "pipeline":
        row["compiled_cache"] = "static" if static else "dynamic"
    with ExitStack() as stack:
        calls = {}
        for key, cand in timed.items():
            pair = (target.timing_pair(cand, inputs) if backend is None
                    else compiled_pair(target, cand, inputs, backend, static))
            run_base, calls[key] = stack.enter_context(pair)
        if backend is not None:  # compile every graph before the rounds: a graph compiled later is timed
            for call in (run_base, *calls.values()):
                harness.once(call)
        graphs = graphs_compiled()
        timings = harness.paired(run_base, calls, repeats=repeats, warmup=1)
        if backend is not None:  # the compiled run of the default config against its eager run
            row["graphs_in_timed_rounds"] = graphs_compiled() - graphs
            compiled_out = harness.once(calls["default"])[1]
            if target.kind == "pipeline":
                row["compiled_vs_eager"] = target.quality(compiled_out, out)
            else:
                row["compiled_outputs_equal_eager"] = same(_cpu(compiled_out), out)
    for key, t in timings.items():
        lo, hi = t.spread
        row[f"{key}_timing"] = t.to_dict(row["flops_fraction"] if key == "default" else None)
        row[f"{key}_speedup"], row[f"{key}_spread"] = t.speedup, [lo, hi]
        row[f"{key}_timing"].update(rounds_s=list(t.candidate_s), baseline_rounds_s=list(t.baseline_s))
    if "zero" in timings:
        lo, hi = row["zero_spread"]
        row["zero_overhead_pct"] = 100 * (1 / row["zero_speedup"] - 1)
        row["zero_overhead_iqr_pct"] = [100 * (1 / hi - 1), 100 * (1 / lo - 1)]
        # the zero config against the null candidate of the same rounds: both run the way timing_pair runs
        # a candidate (LMs: on a deep copy of the model), so the copy's own cost cancels
        vs_null = harness.Timing(timings["null"].candidate_s, timings["zero"].candidate_s)
        lo, hi = vs_null.spread
        row["zero_vs_null_overhead_pct"] = 100 * (1 / vs_null.speedup - 1)
        row["zero_vs_null_iqr_pct"] = [100 * (1 / hi - 1), 100 * (1 / lo - 1)]
    row["speedup_over_bound"] = row["default_speedup"] / row["flops_bound"] if row["flops_bound"] else None
    row["seconds"] = time.perf_counter() - t0
    return row


def model_rows(name: str, techs: list[Technique], args: Any) -> list[dict[str, Any]]:
    """Every selected technique of zoo model ``name``, against one baseline run."""
    todo = [t for t in techs if t.not_measured is None]
    rows = [{"technique": t.name, "model": name, "status": f"not measured: {t.not_measured}"}
            for t in techs if t.not_measured is not None]
    if not todo:
        return rows
    target, inputs = model_target(name, args)
    if args.compile and target.kind == "pipeline":
        compile_in_place(target, args.compile)
    ref, base_flops, base_s = counted_run(target, target.baseline(), inputs)
    print(f"{name}: {len(inputs)} inputs, {base_flops / 1e9:.3g} GFLOPs (counted run {base_s:.1f} s)")
    for tech in todo:
        try:
            row = measure(tech, name, target, inputs, ref, base_flops, args.repeats, args.compile)
        except Exception as e:  # one technique failing must not lose the others' rows; the row says why
            row = {"technique": tech.name, "model": name, "status": f"failed: {type(e).__name__}: {e}"}
        row["inputs"] = len(inputs)
        print(f"  {tech.name}: {row['status']}" + (f", {row['seconds']:.0f} s" if "seconds" in row else ""))
        rows.append(row)
    return rows


def pct(x: float) -> str:
    return f"{x:+.1f} %"


def table_row(r: dict[str, Any]) -> list[str]:
    """The Markdown row of one result (``-`` where nothing was measured)."""
    if r["status"] != "measured":
        return [r["technique"], r["model"], r["status"], "-", "-", "-", "-", "-"]
    if "zero_overhead_pct" in r:
        lo, hi = r["zero_overhead_iqr_pct"]
        zero = f"{pct(r['zero_overhead_pct'])} ({pct(lo)} to {pct(hi)})"
        if not r["zero_skips_nothing"]:
            zero += (f" **zero config skips: FLOPs {r['zero_flops_fraction']:.4f}, "
                     f"outputs {'equal' if r['zero_outputs_equal'] else 'differ'}**")
    else:
        zero = "no zero-skip config"
    lo, hi = r["default_spread"]
    bound = f"{r['flops_bound']:.2f}x" if r["flops_bound"] else "-"
    ratio = f"{r['speedup_over_bound']:.2f}" if r["speedup_over_bound"] is not None else "-"
    if r["flops_bound"] and lo > r["flops_bound"]:  # faster than its FLOPs allow: not the skipping alone
        ratio += " (above: FLOPs are not time, see notes)"
    quality = f"{r['metric']} {r['quality'][r['metric']]:.3g}"
    if r.get("compiled_outputs_equal_eager") is False:
        quality += " **compiled tokens differ from eager**"
    if "compiled_vs_eager" in r:
        quality += f" (compiled vs eager: psnr {r['compiled_vs_eager']['psnr']:.3g})"
    if r.get("graphs_in_timed_rounds"):
        quality += f" **{r['graphs_in_timed_rounds']} graphs compiled in the timed rounds**"
    return [r["technique"], r["model"], zero, r["default_label"], f"{r['default_speedup']:.2f}x ({lo:.2f}-{hi:.2f})",
            bound, ratio, quality]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = harness.arguments(__doc__, repeats=15, out=harness.RESULTS / "overhead.json", full_doc=True,
                          smoke="seconds: stdlib-lm and digits-dit, 1 input, 4 steps / tokens, 3 pairs")
    p.add_argument("--models", default=None, help="comma-separated zoo names (default: every technique's model)")
    p.add_argument("--techniques", default=None, help="comma-separated technique ids (default: all)")
    p.add_argument("--inputs", type=int, default=None, help=f"stock inputs per run (default by kind: {INPUTS})")
    p.add_argument("--steps", type=int, default=None, help="pipelines: baseline steps (default: 25)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="language models: greedy tokens per prompt")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="time compiled runs (torch.compile, default backend inductor): LMs decode on a static cache, "
                        "pipelines compile their denoiser in place (see benchmarks/_compiled_pairs.py)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="measure nothing: join the rows of earlier runs (one per model, say) into --out; "
                        "a later file's row for the same technique and model replaces an earlier one")
    args = p.parse_args(argv)
    if args.merge:
        runs = [json.loads(Path(f).read_text()) for f in args.merge]
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for row in (row for r in runs for row in r["rows"]):  # a later file's row replaces an earlier one's
            rows[row["technique"], row["model"]] = row
        merged = [m for f, r in zip(args.merge, runs, strict=True) for m in r["meta"].get("merged") or [str(f)]]
        out = {"meta": {**runs[0]["meta"], "merged": merged}, "rows": list(rows.values())}  # every run, merges kept
        return report(out, args.out)
    if args.smoke:
        args.models = args.models or "stdlib-lm,digits-dit"
        args.inputs, args.steps, args.max_new_tokens, args.repeats = 1, 4, 4, 3
    harness.setup(args)
    if args.compile:  # every config compiles its own graphs (a copy of the model each)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    known = {t.name for t in TECHNIQUES}
    chosen = set(args.techniques.split(",")) if args.techniques else known
    if chosen - known:
        p.error(f"unknown techniques {sorted(chosen - known)}; known: {sorted(known)}")
    wanted = args.models.split(",") if args.models else None
    by_model: dict[str, list[Technique]] = {}
    for t in TECHNIQUES:
        for m in t.models:
            if t.name in chosen and (wanted is None or m in wanted):
                by_model.setdefault(m, []).append(t)
    out: dict[str, Any] = {"meta": {"machine": harness.machine(), "threads": torch.get_num_threads(),
                                    "repeats": args.repeats, "max_new_tokens": args.max_new_tokens,
                                    "steps": args.steps or STEPS, "smoke": args.smoke,
                                    "mode": f"compiled ({args.compile})" if args.compile else "eager"},
                           "rows": []}
    for name, techs in by_model.items():
        out["rows"] += model_rows(name, techs, args)
    return report(out, args.out)


def pairs_note(out: dict[str, Any]) -> str:
    """How many pairs each figure is the median of: one number, or per row where merged runs differ."""
    counts = {(r["model"], r["technique"]): r["null_timing"]["pairs"] for r in out["rows"]
              if isinstance(r.get("null_timing"), dict) and "pairs" in r["null_timing"]}
    if len(set(counts.values())) <= 1:
        return f"{next(iter(counts.values()), out['meta']['repeats'])} pairs per figure"
    by_n: dict[int, list[str]] = {}
    for (model, tech), n in counts.items():
        by_n.setdefault(n, []).append(f"{model} / {tech}")
    return "pairs per figure: " + "; ".join(f"{n} ({', '.join(rows)})" for n, rows in sorted(by_n.items()))


def report(out: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Print and write ``out``'s table (Markdown beside the JSON)."""
    head = ["technique", "model", "zero-skip overhead % (IQR)", "default config", "speedup (IQR)", "FLOPs bound",
            "speedup / bound", "quality"]
    summary = harness.table(head, [table_row(r) for r in out["rows"]])
    nulls = [f"{r['model']} / {r['technique']}: null {r['null_speedup']:.3f}x"
             + (f", zero vs null {pct(r['zero_vs_null_overhead_pct'])}" if "zero_vs_null_overhead_pct" in r else "")
             for r in out["rows"] if "null_speedup" in r]
    notes = (f"{out['meta']['mode'].capitalize()}, paired against the unmodified model (median of the paired ratios, quartiles in brackets); "
             f"{pairs_note(out)}; overhead % = 1 / speedup - 1. Null pairs (the baseline against "
             "itself, run as the target's timing_pair runs a candidate; LMs: a deep copy of the model), and the "
             "zero-skip overhead against that null candidate in the same rounds: " + ("; ".join(nulls) or "none") + ".")
    print(summary + "\n\n" + notes)
    harness.write(path, out, summary + "\n\n" + notes)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
