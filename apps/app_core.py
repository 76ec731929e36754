"""What every tab of the app shares: the user-error type, paired timing driven by the tab's progress
bar, the speed rows of a result table, and images enlarged for the screen.

Every speed the app shows comes from :func:`mmskip.timing.paired` (interleaved pairs, warm-up
excluded, median and quartiles), never from one timing of a sub-second run: one run of these tiny
models is noise (a single click once read 2.55x, 0.72x and 1.22x for the same settings).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from mmskip.timing import Timing, paired

Progress = Callable[..., Any] | None  # gradio's tracker (``progress(fraction, desc=...)``), or None outside the UI

DEFAULT_PAIRS = 3  # interleaved pairs per timing: a click stays quick; the spread says how much to trust it
WARMUP = 1  # rounds run first and dropped


class AppError(ValueError):
    """Bad input the UI shows as a message (the app keeps serving and logs one line)."""


def stage(progress: Progress, fraction: float, desc: str) -> None:
    """Tell the UI's progress bar what runs now (a no-op outside the UI)."""
    if progress is not None:
        progress(fraction, desc=desc)


def check_pairs(pairs: Any) -> int:
    """The number of timing pairs as an int, refused below 3 (a median and a spread need three)."""
    if pairs is None or int(pairs) < 3:
        raise AppError(f"timing pairs must be at least 3 (a median and a spread need three), got {pairs}")
    return int(pairs)


def timed(baseline: Callable[[], Any], candidates: Mapping[str, Callable[[], Any]], pairs: int, progress: Progress,
          span: tuple[float, float], desc: str, warmup: int = WARMUP) -> dict[str, Timing]:
    """:func:`mmskip.timing.paired` with its rounds reported on the progress bar between ``span``."""
    lo, hi = span

    def report(done: int, total: int) -> None:
        stage(progress, lo + (hi - lo) * done / total, f"{desc}: round {done}/{total}"
              + (f" ({warmup} warm-up)" if warmup else ""))

    stage(progress, lo, desc)
    with torch.no_grad():
        return paired(baseline, candidates, repeats=check_pairs(pairs), warmup=warmup, progress=report)


def speed_cell(t: Timing) -> str:
    """``**1.42×** (1.35–1.51, 3 pairs)``: the median paired speedup, its quartiles, the pairs."""
    lo, hi = t.spread
    return f"**{t.speedup:.2f}×** ({lo:.2f}–{hi:.2f}, {t.pairs} pairs)"


def bound_cell(fraction: float | None) -> str:
    """The speedup the kept FLOPs allow, ``1 / fraction``, beside the fraction itself."""
    if not fraction:
        return "-"
    return f"{1 / fraction:.2f}× (FLOPs fraction {fraction:.2f})"


def warnings_md(checks: Mapping[str, tuple[Timing, float | None]]) -> str:
    """A visible line per timing whose speedup exceeds its FLOPs bound by more than its spread allows."""
    lines = [f"⚠️ **{name}**: {w}" for name, (t, fraction) in checks.items()
             if (w := t.bound_warning(fraction)) is not None]
    return "\n\n".join(lines)


def timing_note(pairs: int, warmup: int = WARMUP) -> str:
    """How the numbers were measured, under every result table."""
    return (f"_Speedups: median of {pairs} interleaved pairs against the baseline"
            f"{f', {warmup} warm-up round excluded' if warmup else ''}; in brackets the quartiles. "
            "Raise **timing pairs** for steadier numbers._")


def enlarge(pic: Any, height: int = 256) -> Any:
    """A PIL image of the tiny zoo models, enlarged (nearest neighbour) for the screen."""
    from PIL import Image

    return pic.resize((pic.width * height // pic.height, height), Image.NEAREST)


def picture(img: torch.Tensor, height: int = 128) -> Any:
    """A grey image in [0, 1] or [-1, 1], enlarged (nearest neighbour) for the screen."""
    from PIL import Image

    img = ((img + 1) / 2 if img.min() < 0 else img).clamp(0, 1)
    return enlarge(Image.fromarray((img.numpy() * 255).astype("uint8")), height)
