"""The demo's summary: the best speedup at each quality level, from tuned fronts (``mmskip.tune``).

For each zoo model, one search (its trial log shared by the floors) on calibration inputs; each
floor's answer is confirmed on held-out inputs with paired timing against the unmodified model.
The rows say what won at each floor (a technique, a step count and sampler, a diffusers cache)
or that nothing was faster than the baseline.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import mmskip
from mmskip import zoo
from mmskip.tuning import make_target
from mmskip.tuning.cli import stock_inputs
from mmskip.tuning.trial_log import TrialLogMismatch

# model -> (metric floors, options for its tuning target)
FLOORS = {"stdlib-lm": (0.95, 0.8), "stdlib-lm-skip": (0.95, 0.8), "digits-dit": (40.0, 30.0),
          "digits-sd": (40.0, 30.0)}


def tune_demo(models: list[str], budget: str, repeats: int, out_dir: Path, inputs: int = 4,
              new_tokens: int = 16, steps: int = 25) -> list[dict[str, Any]]:
    """One row per (model, floor): the tuned setting's held-out speed and quality, and the message."""
    rows = []
    for name in models:
        loaded = zoo.load(name)
        if isinstance(loaded, tuple):
            model, options = loaded[0].float().eval(), {"tokenizer": loaded[1], "max_new_tokens": new_tokens}
        else:
            model, options = loaded, {"steps": steps}
        target = make_target(model, **options)
        calib, held = stock_inputs(name, target, inputs), stock_inputs(name, target, inputs, inputs)
        print(f"\n== Tuning {name} (budget {budget}; {inputs} calibration + {inputs} held-out inputs) ==")
        for floor in FLOORS[name]:
            folder = out_dir / "tune" / name
            try:
                r = _tune(target, calib, held, floor, budget, folder, repeats)
            except TrialLogMismatch:  # the demo's own log, of other weights (a retrained zoo model): start afresh
                shutil.rmtree(folder, ignore_errors=True)
                r = _tune(target, calib, held, floor, budget, folder, repeats)
            best = r.best_measured
            rows.append({"model": name, "metric": r.metric, "floor": floor, "best": best.candidate.label,
                         "family": best.candidate.family, "speedup": best.speedup, "spread": list(best.spread),
                         "quality": best.quality[r.metric], "flops_bound": best.flops_bound,
                         "forward_bound": best.forward_bound,
                         "faster": best.candidate.family != "baseline", "message": r.message, "trials": r.trials})
            print(f"{name}, {r.metric} >= {floor:g}: {r.message}")
    return rows


def _tune(target: Any, calib: list, held: list, floor: float, budget: str, folder: Path, repeats: int) -> Any:
    return mmskip.tune(target, calib, held_out=held, floor=floor, budget=budget, out=folder, repeats=repeats,
                       finalists=3, progress=False)


def tuned_summary(rows: list[dict[str, Any]]) -> list[str]:
    """``model, metric >= floor   1.42x (1.35-1.51)  setting`` or ``nothing faster than the baseline``."""
    lines = []
    for r in rows:
        label = f"{r['model']}, {r['metric']} >= {r['floor']:g}"
        if r["faster"]:
            lo, hi = r["spread"]
            lines.append(f"{label:36s} {r['speedup']:5.2f}x ({lo:.2f}-{hi:.2f})  {r['best']}  "
                         f"[{r['metric']} {r['quality']:.3g}, {r['trials']} trials]")
        else:
            lines.append(f"{label:36s}   --   nothing faster than the baseline ({r['trials']} trials)")
    return lines
