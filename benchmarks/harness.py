"""The benchmarks' shared harness: common arguments, thread setup, paired timing, results files.

Every script in ``benchmarks/`` is one experiment. What they all need lives here, so each script
keeps only what it measures:

* :func:`arguments` — an ``ArgumentParser`` with the common options (``--smoke``, ``--repeats``,
  ``--threads``, ``--out``, optionally ``--device``); the script adds its own.
* :func:`setup` — the torch thread count from ``--threads`` (1 keeps timings stable on a shared CPU).
* ``paired`` / ``repeated`` / ``once`` / ``Candidate`` / ``sync`` — :mod:`mmskip.timing`, the one way mmskip times a speedup
  (interleaved pairs, warm-up dropped, CUDA synced, median and quartiles).
* :func:`write` — the results: JSON, the Markdown table beside it (``.md``), and an optional PNG.
* :func:`table` — a Markdown table from a header and rows; :func:`figure` — a matplotlib figure that
  needs no display; :func:`machine` — the device's name for the results' metadata.

Scripts import it as a sibling (``import harness``): ``python benchmarks/x.py`` and ``mmskip bench``
both put ``benchmarks/`` on ``sys.path``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from mmskip.timing import Candidate, Timing, once, paired, repeated, sync

__all__ = ["RESULTS", "Candidate", "Timing", "arguments", "figure", "machine", "once", "paired", "repeated", "setup",
           "sync", "table", "write"]

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "results"


def arguments(doc: str, *, repeats: int | None = 3, threads: int | None = 1, out: str | Path | None = None,
              device: bool = False, smoke: str = "seconds-long run that exercises every code path (numbers meaningless)",
              full_doc: bool = False) -> argparse.ArgumentParser:
    """A parser with the options every benchmark shares; the script adds its own and parses.

    Args:
        doc: the script's module docstring (its first line is the description; all of it with ``full_doc``).
        repeats: default of ``--repeats`` (timed rounds, median); ``None`` leaves the option out.
        threads: default of ``--threads`` (torch threads); ``None`` leaves the option out.
        out: default of ``--out`` (the results path, a ``pathlib.Path``); ``None`` means the script picks one.
        device: add ``--device`` (default ``cuda`` when there is one, else ``cpu``).
        smoke: the help text of ``--smoke`` (what the script's smoke run does).
        full_doc: show the whole docstring in ``--help`` rather than its first line.
    """
    if full_doc:
        p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    else:
        p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    p.add_argument("--smoke", action="store_true", help=smoke)
    if repeats is not None:
        p.add_argument("--repeats", type=int, default=repeats, help="timed rounds (median; paired with the baseline)")
    if threads is not None:
        p.add_argument("--threads", type=int, default=threads,
                       help="torch threads (1 keeps timings stable on a shared CPU)")
    p.add_argument("--out", type=Path, default=Path(out) if out is not None else None,
                   help="results JSON (.md and .png are written beside it)")
    if device:
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def setup(args: argparse.Namespace) -> None:
    """Apply the common options that change the process: the torch thread count."""
    threads = getattr(args, "threads", None)
    if threads:
        torch.set_num_threads(threads)


def machine(device: str | torch.device | None = None) -> str:
    """The GPU's name for a CUDA device, else the CPU's (for the results' metadata)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A Markdown table; ``align`` has one letter per column: ``l`` (default) or ``r``."""
    align = align or "l" * len(header)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def figure(**kwargs: Any) -> Any:
    """A matplotlib ``Figure`` on the Agg canvas (no display, no pyplot state): ``fig.savefig(path)``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def write(out: str | Path, result: dict[str, Any], markdown: str | None = None,
          plot: Callable[[Path], None] | None = None, png: str | Path | None = None, indent: int = 1) -> Path:
    """Write ``result`` as JSON to ``out``; ``markdown`` beside it (``.md``); ``plot(png)`` for a figure.

    ``png`` defaults to ``out`` with the suffix ``.png``. Values JSON cannot hold (paths, dtypes) are
    written as strings. Returns the JSON's path.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=indent, default=str) + "\n")
    written = [out.name]
    if markdown is not None:
        out.with_suffix(".md").write_text(markdown.rstrip("\n") + "\n")
        written.append(out.with_suffix(".md").name)
    if plot is not None:
        png = Path(png) if png is not None else out.with_suffix(".png")
        plot(png)
        written.append(png.name)
    print(f"\nwrote {', '.join(written)} in {out.parent}")
    return out
