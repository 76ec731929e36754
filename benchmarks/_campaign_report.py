"""``gpu_campaign.py``'s report: one Markdown table per section and one figure (speedup beside FLOPs bound)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import harness
from _campaign_quality import cell

__all__ = ["markdown", "plot"]

TITLES = {"llm": "LLM decoding", "vision": "Vision-language prefill and generation", "diffusion": "Diffusion denoisers"}


def _num(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _figure(r: dict[str, Any]) -> str:
    if r.get("error"):
        return "error: " + r["error"][:120].replace("|", "/").replace("\n", " ")
    if r.get("skipped"):
        return "skipped: " + r["skipped"][:120].replace("|", "/")
    if r.get("speedup") is None:
        return "-"
    lo, hi = r["spread"]
    return f"{r['speedup']:.2f}x ({lo:.2f}-{hi:.2f}){'' if r.get('paired', True) else ' unpaired'}"


def _notes(r: dict[str, Any]) -> str:
    """What the row says beside speed: fidelity to plain, tokens, compile time."""
    out = []
    if r.get("psnr") is not None:
        out.append(f"PSNR {r['psnr']:.1f} dB")
    if r.get("agreement_with_plain") is not None:
        out.append(f"tokens = plain {r['agreement_with_plain']:.2f}")
    if r.get("identical") is not None:
        out.append("identical to plain" if r["identical"] else "not identical to plain")
    if r.get("last_logits_cosine") is not None:
        out.append(f"last-logit cos {r['last_logits_cosine']:.3f}")
    if r.get("skip_off_equals_parent") is not None:
        out.append(f"skip off {'=' if r['skip_off_equals_parent'] else '!='} parent")
    if r.get("skip_on_max_abs_diff_vs_default") is not None:
        out.append(f"skip on vs default backend: max abs diff {r['skip_on_max_abs_diff_vs_default']:.2g} "
                   f"({'within' if r['skip_on_within_bf16_tol'] else 'outside'} {r['bf16_atol']}; parent "
                   f"{r['parent_max_abs_diff_vs_default']:.2g})")
    if r.get("tokens") is not None:
        out.append(f"{r['tokens']} tokens")
    if r.get("compile_warmup_s") is not None or r.get("compile_s") is not None:
        out.append(f"compile {r.get('compile_warmup_s') or r.get('compile_s'):.0f} s")
    if r.get("note"):
        out.append(str(r["note"]).replace("|", "/")[:100])
    return ", ".join(out) or "-"


def section_table(rows: list[dict[str, Any]]) -> str:
    head = ("model / shape", "technique", "batch", "mode", "speedup (IQR)", "FLOPs bound", "of bound", "host sync",
            "notes", "zoo-model quality [config; source]")
    body = []
    for r in rows:
        bound, speed = r.get("flops_bound"), r.get("speedup")
        of = speed / bound if speed and bound else None
        body.append((r.get("model", "-"), r.get("technique", "-"), _num(r.get("batch"), "d"), r.get("mode", "-"),
                     _figure(r), _num(bound), _num(of), str(r.get("host_sync", "-")).replace("|", "/")[:160],
                     _notes(r), cell(r.get("quality"))))
    return harness.table(head, body, "llrlrrrlll")


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = ["# benchmarks/gpu_campaign.py", "",
             f"{meta['device']}, {meta['dtype']}; torch {meta['torch']}, transformers {meta['transformers']}, "
             f"diffusers {meta['diffusers']}; {meta['date']}{' (smoke: numbers meaningless)' if meta['smoke'] else ''}.",
             "", f"Weights: {meta['weights']}. Speedups are medians against the plain model run the same way (eager "
             "against eager, compiled against compiled), paired and interleaved, warm-up dropped; IQR in brackets; "
             "'unpaired' = ratio of medians of separately repeated runs. Random weights give speed only: the last column "
             "is the zoo model's quality for the technique (trained weights), from the committed results file named.", ""]
    for name in meta["sections"]:
        rows = [r for r in result["rows"] if r.get("section") == name]
        lines += [f"## {TITLES.get(name, name)}", "",
                  f"{len(rows)} rows in {result.get('section_s', {}).get(name, 0):.0f} s.", ""]
        lines += [section_table(rows) if rows else "(no rows)", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], png: Path) -> None:
    """One panel per section: each measured row's speedup (bar, IQR whisker) and FLOPs bound (dot)."""
    names = result["meta"]["sections"]
    panels = [(n, [r for r in result["rows"] if r.get("section") == n and r.get("speedup") is not None])
              for n in names]
    height = max(3.0, 0.22 * sum(max(len(rs), 1) for _, rs in panels) + 1.2 * len(panels))
    fig = harness.figure(figsize=(9, height), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (name, rows) in zip(axes, panels):
        ax.set_title(f"{TITLES.get(name, name)} ({result['meta']['device']})", fontsize=9)
        if not rows:
            ax.text(0.5, 0.5, "no measured rows", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        labels = [f"{r['technique']} b{r.get('batch')} {r.get('mode', '')} [{str(r.get('model', ''))[:18]}]" for r in rows]
        y = list(range(len(rows)))
        speed = [r["speedup"] for r in rows]
        # a ratio of medians (unpaired rows) can fall outside the quartiles of the cross ratios
        err = [[max(s - r["spread"][0], 0.0) for s, r in zip(speed, rows)],
               [max(r["spread"][1] - s, 0.0) for s, r in zip(speed, rows)]]
        ax.barh(y, speed, xerr=err, color="tab:blue", alpha=0.7, label="speedup (IQR)")
        bounds = [(i, r["flops_bound"]) for i, r in enumerate(rows) if r.get("flops_bound")]
        if bounds:
            ax.scatter([b for _, b in bounds], [i for i, _ in bounds], color="tab:red", marker="|", s=120,
                       label="FLOPs bound", zorder=3)
        ax.axvline(1.0, color="k", lw=0.7)
        top = max([*speed, *(b for _, b in bounds), 1.0])
        ax.set_xlim(0, 1.25 * top)  # whiskers of noisy rows are clipped, not the bars
        ax.set_yticks(y, labels, fontsize=6)
        ax.invert_yaxis()
        ax.legend(fontsize=7, loc="lower right")
    fig.savefig(png, dpi=110)
