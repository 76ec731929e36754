"""What ``handle.stats()`` counts: executed and skipped work per hooked item, and the FLOPs estimate."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import torch

__all__ = ["SkipStats"]


class SkipStats:
    """Counts of seen and skipped work, filled in by a technique's hooks.

    ``seen[name]`` counts the units (tokens for layers, calls for diffusion blocks) that
    reached a hooked item and ``skipped[name]`` those it did not compute; ``cost[name]`` is the
    item's FLOPs per unit, used to estimate the fraction of FLOPs actually spent.
    ``fixed_cost`` per ``fixed_units`` covers parts that never skip (the LM head, the VAE).
    """

    def __init__(self) -> None:
        self.seen: dict[str, float] = defaultdict(float)
        self.skipped: dict[str, float] = defaultdict(float)
        self.cost: dict[str, float] = {}
        self.fixed_cost: float = 0.0
        self.fixed_units: float = 0.0
        self.uncounted = False  # some work ran inside a compiled graph, where nothing is counted

    def record(self, name: str, units: float = 1.0, skipped: float = 0.0) -> None:
        """``units`` reached item ``name``; ``skipped`` of them were not computed. Not counted
        inside a ``torch.compile``d graph (a counter there would be a guard on every value): the
        stats then say so instead of reporting the uncounted work as not skipped."""
        if torch.compiler.is_compiling():
            self.uncounted = True
            return
        self.seen[name] += units
        if skipped:
            self.skipped[name] += skipped

    def reset(self) -> None:
        self.seen.clear()
        self.skipped.clear()
        self.fixed_units = 0.0
        self.uncounted = False

    def flops(self) -> tuple[float, float]:
        """(FLOPs spent, FLOPs the unmodified model would spend on the same work), estimated."""
        full = self.fixed_cost * self.fixed_units
        saved = 0.0
        for name, c in self.cost.items():
            full += c * self.seen.get(name, 0.0)
            saved += c * self.skipped.get(name, 0.0)
        return full - saved, full

    def flops_fraction(self) -> float:
        """Estimated FLOPs spent / FLOPs the unmodified model would spend on the same work."""
        spent, full = self.flops()
        return spent / full if full else 1.0

    def as_dict(self) -> dict[str, Any]:
        names = sorted(set(self.seen) | set(self.skipped), key=_natural_key)
        items = {}
        for n in names:
            seen, skipped = self.seen.get(n, 0.0), self.skipped.get(n, 0.0)
            items[n] = {"executed": seen - skipped, "skipped": skipped}
        out = {
            "items": items,
            "executed": sum(v["executed"] for v in items.values()),
            "skipped": sum(v["skipped"] for v in items.values()),
            "flops_fraction": self.flops_fraction(),
            "flops": dict(zip(("spent", "full"), self.flops())),
        }
        if self.uncounted:  # never report compiled work as unskipped
            out.update(flops_fraction=None, flops=None,
                       counted="partly: decisions made inside torch.compile graphs are not counted")
        return out


def _natural_key(name: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))
