"""What every section of ``gpu_campaign.py`` shares: the row format, the time box, the host-sync check.

A section gets a :class:`Context`: its device and dtype, its deadline, and ``emit`` (which records a
row as soon as it exists, so a timeout still leaves every finished row on disk). :meth:`Context.attempt`
runs one row's measurement: it skips the row when too little time is left and turns an exception into
the row's ``error`` string, so one failing technique never stops the others.
"""

from __future__ import annotations

import argparse
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import harness
import torch

__all__ = ["Context", "host_sync", "timing_fields", "versions"]


def versions(device: torch.device) -> dict[str, str | None]:
    """Device name and library versions, written on every row."""
    import transformers

    try:
        import diffusers

        diff: str | None = diffusers.__version__
    except ImportError:
        diff = None
    return {"device": harness.machine(device), "torch": torch.__version__, "transformers": transformers.__version__,
            "diffusers": diff}


def _site(filename: str, lineno: int) -> str:
    return f"{'/'.join(filename.rsplit('/', 2)[-2:])}:{lineno}"


def _sync_sites(fn: Callable[[], Any]) -> dict[str, int]:
    """Every host sync of one call of ``fn`` by the Python line that made it (``set_sync_debug_mode("warn")``
    warns from C++, so each warning is attributed to the Python frame that called the syncing op)."""
    sites: dict[str, int] = {}
    prev = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.no_grad():
                fn()
        finally:
            torch.cuda.set_sync_debug_mode(prev)
    for w in caught:
        if "synchroniz" in str(w.message).lower():
            key = _site(w.filename, w.lineno)
            sites[key] = sites.get(key, 0) + 1
    return sites


def host_sync(fn: Callable[[], Any], device: torch.device) -> str:
    """Run ``fn`` once (untimed) under ``torch.cuda.set_sync_debug_mode("error")``: ``"none"`` when it made no
    host sync, else ``"synced: <error> at <frame>"`` (the innermost frame outside torch, preferring one outside
    site-packages, i.e. this project's code), followed by every sync site of a second call in "warn" mode
    (``file:line xN``). Not checked on CPU."""
    if device.type != "cuda":
        return "not checked (CPU)"
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            fn()
        return "none"
    except RuntimeError as err:
        frames = [f for f in traceback.extract_tb(err.__traceback__) if "/torch/" not in f.filename]
        own = [f for f in frames if "site-packages" not in f.filename] or frames
        where = f" at {_site(own[-1].filename, own[-1].lineno or 0)}" if own else ""
        first = f"synced: {str(err).splitlines()[0][:120]}{where}"
    finally:
        torch.cuda.set_sync_debug_mode(prev)
        torch.cuda.synchronize()
    try:
        sites = _sync_sites(fn)
    except Exception as err:  # the listing is extra; the first sync is already known
        return f"{first}; sites not listed ({type(err).__name__})"
    listed = ", ".join(f"{k} x{v}" for k, v in sorted(sites.items(), key=lambda kv: -kv[1])[:8])
    return f"{first}; sites: {listed or '-'}"


def timing_fields(t: harness.Timing) -> dict[str, Any]:
    """A paired timing's speedup (median ratio), quartiles and IQR."""
    lo, hi = t.spread
    return {"speedup": t.speedup, "spread": [lo, hi], "iqr": hi - lo, "pairs": t.pairs, "paired": True}


@dataclass
class Context:
    """One section's run: where it runs, until when, and where its rows go."""

    section: str
    device: torch.device
    dtype: torch.dtype
    deadline: float  # time.time() after which no new row starts
    args: argparse.Namespace
    emit: Callable[[dict[str, Any]], None]
    meta: dict[str, Any] = field(default_factory=dict)
    out: Path | None = None  # the campaign's results JSON (sections write files of their own beside it)

    @property
    def smoke(self) -> bool:
        return bool(self.args.smoke)

    @property
    def repeats(self) -> int:
        return int(self.args.repeats)

    def left(self) -> float:
        """Seconds until the section's deadline."""
        return self.deadline - time.time()

    def row(self, model: str, technique: str, batch: int | None, mode: str, **fields: Any) -> dict[str, Any]:
        """Record one row now (and print its progress line)."""
        row = {"section": self.section, "model": model, "technique": technique, "batch": batch, "mode": mode,
               "dtype": str(self.dtype).removeprefix("torch."), **self.meta, **fields}
        self.emit(row)
        print(f"[{self.section}] {model} | {technique} | batch {batch} | {mode}: {status(row)}", flush=True)
        return row

    def attempt(self, model: str, technique: str, batch: int | None, mode: str, measure: Callable[[], dict[str, Any]],
                need_s: float = 0.0) -> dict[str, Any]:
        """``measure()``'s fields as a row; a skipped row when under ``need_s`` seconds are left; an error row when
        it raises (the section goes on)."""
        if self.left() < need_s:
            return self.row(model, technique, batch, mode,
                            skipped=f"out of time: {self.left():.0f} s left of the section, ~{need_s:.0f} s needed")
        t0 = time.time()
        try:
            fields = measure()
        except Exception as err:  # one failing technique must not stop the section
            traceback.print_exc(limit=6)
            fields = {"error": f"{type(err).__name__}: {str(err)[:400]}"}
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        fields["wall_s"] = time.time() - t0
        return self.row(model, technique, batch, mode, **fields)


def status(row: dict[str, Any]) -> str:
    """A row's progress text: speedup (spread) and bound, or why it has none."""
    if row.get("error"):
        return f"error: {row['error'][:200]}"
    if row.get("skipped"):
        return f"skipped: {row['skipped']}"
    if row.get("speedup") is None:
        return "done"
    lo, hi = row["spread"]
    bound = row.get("flops_bound")
    return (f"{row['speedup']:.2f}x ({lo:.2f}-{hi:.2f}), FLOPs bound "
            f"{'-' if bound is None else format(bound, '.2f')}, host sync {row.get('host_sync', '-')}")
