"""The app's Tune tab: ``mmskip.tune`` on a zoo model, the measured front as a plot and a table, and
the tuned setting's output beside the baseline's and the best fewer-steps setting's.

Each (model, floor, budget) tunes into its own folder under the system's temp dir, so a second
click continues the first one's trial log (a time budget adds trials; a trial budget already spent
only re-confirms the finalists).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from app_core import AppError, Progress, check_pairs, picture, stage

TUNE_MODELS = ["digits-dit", "digits-sd", "stdlib-lm", "stdlib-lm-skip", "digits-llava"]
_ROOT = Path(tempfile.gettempdir()) / "mmskip-app-tune"


def _floor(text: str) -> tuple[str | None, float | None]:
    from mmskip.cli import UsageError
    from mmskip.tuning.cli import parse_floor

    try:
        return parse_floor(text.strip() or None)
    except UsageError as e:
        raise AppError(str(e)) from None


def _load(name: str) -> tuple[Any, dict[str, Any]]:
    from mmskip.tuning.cli import load_model

    try:
        return load_model(name)
    except (FileNotFoundError, ValueError) as e:
        raise AppError(f"{name}: {e}") from None


def _show(outputs: Any, tokenizer: Any) -> Any:
    """An output for the screen: a picture for images, text for token ids, else its repr."""
    if isinstance(outputs, torch.Tensor) and outputs.dim() == 4:
        img = outputs[0].float()
        return picture(img.mean(0) if img.shape[0] != 3 else img.permute(1, 2, 0))
    if isinstance(outputs, list) and outputs and isinstance(outputs[0], torch.Tensor) and tokenizer is not None:
        return tokenizer.decode(outputs[0])
    return str(outputs[0] if isinstance(outputs, list) and outputs else outputs)


def run_tune(model_name: str, floor: str = "", budget: str = "60s", inputs: int = 4, pairs: int = 3,
             progress: Progress = None) -> tuple[Any, str, Any, Any, Any, str]:
    """(front plot, markdown table + message, baseline output, tuned output, fewer-steps output, labels)."""
    from mmskip.tuning import TuneError, make_target, parse_budget, tune
    from mmskip.tuning.cli import stock_inputs
    from mmskip.tuning.trial_log import TrialLogMismatch

    pairs = check_pairs(pairs)
    metric, value = _floor(floor or "")
    try:
        parse_budget(budget)
    except TuneError as e:
        raise AppError(str(e)) from None
    inputs = int(inputs)
    if inputs < 1:
        raise AppError(f"inputs must be >= 1, got {inputs}")
    stage(progress, 0.02, f"loading {model_name}")
    model, options = _load(model_name)
    if "tokenizer" in options:  # language models: short continuations keep a click quick
        options["max_new_tokens"] = 16
    target = make_target(model, **options)
    try:
        calib = stock_inputs(model_name, target, inputs)
        held = stock_inputs(model_name, target, inputs, offset=inputs)
    except ValueError as e:
        raise AppError(str(e)) from None
    out = _ROOT / f"{Path(model_name).name}-{metric or 'default'}-{value}-{budget}-{inputs}"
    stage(progress, 0.1, f"tuning {model_name} (budget {budget}): searching, then timing the finalists")
    def run() -> Any:
        return tune(target, calib, held_out=held, floor=value, metric=metric, budget=budget, out=out,
                    repeats=pairs, progress=False)

    try:
        try:
            result = run()
        except TrialLogMismatch:  # the app's own cache folder, from another mmskip version: start it afresh
            shutil.rmtree(out, ignore_errors=True)
            result = run()
    except TuneError as e:
        raise AppError(str(e)) from None
    stage(progress, 0.9, "drawing the front and the tuned output")
    fig = result.plot()
    fig.canvas.draw()
    import numpy as np

    plot = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    tokenizer = options.get("tokenizer")
    shown: dict[str, Any] = {"baseline": None, "tuned": None, "fewer": None}
    fewer = max((m for m in result.measured if m.candidate.family == "fewer-steps"
                 and m.quality[result.metric] >= result.floor), key=lambda m: m.speedup, default=None)
    picks = {"baseline": result.measured[0], "tuned": result.best_measured, "fewer": fewer}
    for key, m in picks.items():
        if m is not None:
            with target.applied(m.candidate):
                shown[key] = _show(target.run(held[:1]), tokenizer)
    labels = " · ".join(f"**{k}**: {m.candidate.label} ({m.speedup:.2f}×)" for k, m in picks.items() if m is not None)
    table = f"{result.message}\n\n{result.table()}\n\n_{result.trials} trials; figures on {len(held)} held-out inputs._"
    return plot, table, shown["baseline"], shown["tuned"], shown["fewer"], labels
