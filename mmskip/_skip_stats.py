"""What ``handle.stats()`` counts: executed and skipped work per hooked item, and the FLOPs estimate."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import torch

__all__ = ["SkipStats"]

Count = float | torch.Tensor
_FIXED = ""  # the accumulator of the parts that never skip


class SkipStats:
    """Counts of seen and skipped work, filled in by a technique's hooks.

    ``seen[name]`` counts the units (tokens for layers, calls for diffusion blocks) that
    reached a hooked item and ``skipped[name]`` those it did not compute; ``cost[name]`` is the
    item's FLOPs per unit, used to estimate the fraction of FLOPs actually spent.
    ``fixed_cost`` per ``fixed_units`` covers parts that never skip (the LM head, the VAE).

    Counts that are tensors (a skip mask's sum) and every count recorded inside a
    ``torch.compile`` graph go to small accumulators on the counted tensors' device instead: the
    hot path then neither waits for the device nor makes a graph guard on a Python number. They
    are read, once, when the stats are asked for.
    """

    def __init__(self) -> None:
        self.seen: dict[str, float] = defaultdict(float)
        self.skipped: dict[str, float] = defaultdict(float)
        self.cost: dict[str, float] = {}
        self.fixed_cost: float = 0.0
        self.fixed_units: float = 0.0
        self._pending: dict[str, torch.Tensor] = {}  # name -> [seen, skipped], not yet read
        self._groups: dict[tuple[str, ...], torch.Tensor] = {}  # names -> [seen] of each, not yet read

    def record(self, name: str, units: Count = 1.0, skipped: Count = 0.0, like: torch.Tensor | None = None) -> None:
        """``units`` reached item ``name``; ``skipped`` of them were not computed. ``like`` is a
        tensor of the hooked item (its device holds the accumulator when a count is kept on
        the device)."""
        if torch.compiler.is_compiling() or isinstance(units, torch.Tensor) or isinstance(skipped, torch.Tensor):
            acc = self._accumulator(name, units, skipped, like)
            for i, v in enumerate((units, skipped)):
                if isinstance(v, torch.Tensor):
                    acc[i] += v.to(acc.device)
                elif type(v) is not int and type(v) is not float or v:  # a literal 0 adds nothing
                    acc[i] += v
            return
        self.seen[name] += units
        if skipped:
            self.skipped[name] += skipped

    def record_each(self, names: list[str], units: Count, like: torch.Tensor | None = None) -> None:
        """``units`` reached every item of ``names`` and none was skipped: :meth:`record` for each,
        in one call (a hook that counts a whole stack of layers per forward). On the device (in a
        compiled graph, or tensor ``units``) the stack shares one accumulator: one in-place add a
        call instead of one per item."""
        if torch.compiler.is_compiling() or isinstance(units, torch.Tensor):
            acc = _device_acc(self._groups, tuple(names), 1, (units, like), like)
            acc += units.to(acc.device) if isinstance(units, torch.Tensor) else units
            return
        seen = self.seen
        for name in names:
            seen[name] += units

    def record_fixed(self, units: Count, like: torch.Tensor | None = None) -> None:
        """``units`` reached the parts that never skip (for example rows through the LM head)."""
        if torch.compiler.is_compiling() or isinstance(units, torch.Tensor):
            acc = self._accumulator(_FIXED, units, 0.0, like)
            acc[0] += units.to(acc.device) if isinstance(units, torch.Tensor) else units
            return
        self.fixed_units += units

    def declare(self, names: list[str], device: torch.device) -> None:
        """Create the device-side accumulators of ``names`` (and of the fixed parts) now, outside
        any compiled graph: a graph that created one would be compiled again once it exists."""
        for name in [*names, _FIXED]:
            if name not in self._pending:
                self._pending[name] = torch.zeros(2, dtype=_dtype(device), device=device)
        if tuple(names) not in self._groups:
            self._groups[tuple(names)] = torch.zeros(1, dtype=_dtype(device), device=device)

    def _accumulator(self, name: str, units: Count, skipped: Count, like: torch.Tensor | None) -> torch.Tensor:
        return _device_acc(self._pending, name, 2, (skipped, units, like), like)

    def _read_pending(self) -> None:
        """Move the device-side counts into the Python totals (one read per item or stack)."""
        if self._groups:
            keys = list(self._groups)
            totals = torch.stack([self._groups[k].to("cpu", torch.float64) for k in keys]).flatten().tolist()
            for names, seen in zip(keys, totals):
                if seen:
                    for name in names:
                        self.seen[name] += seen
            for acc in self._groups.values():
                acc.zero_()
        if not self._pending:
            return
        names = list(self._pending)
        values = torch.stack([self._pending[n].to("cpu", torch.float64) for n in names]).tolist()
        for name, (seen, skipped) in zip(names, values):
            if name == _FIXED:
                self.fixed_units += seen
                continue
            if seen or skipped:  # as the Python path: an item that was recorded has a ``seen`` entry
                self.seen[name] += seen
            if skipped:
                self.skipped[name] += skipped
        for acc in self._pending.values():
            acc.zero_()  # kept, not dropped: compiled graphs hold them as inputs

    def reset(self) -> None:
        self.seen.clear()
        self.skipped.clear()
        self.fixed_units = 0.0
        for acc in [*self._pending.values(), *self._groups.values()]:
            acc.zero_()

    def flops(self) -> tuple[float, float]:
        """(FLOPs spent, FLOPs the unmodified model would spend on the same work), estimated."""
        self._read_pending()
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
        self._read_pending()
        names = sorted(set(self.seen) | set(self.skipped), key=_natural_key)
        items = {}
        for n in names:
            seen, skipped = self.seen.get(n, 0.0), self.skipped.get(n, 0.0)
            items[n] = {"executed": seen - skipped, "skipped": skipped}
        return {
            "items": items,
            "executed": sum(v["executed"] for v in items.values()),
            "skipped": sum(v["skipped"] for v in items.values()),
            "flops_fraction": self.flops_fraction(),
            "flops": dict(zip(("spent", "full"), self.flops())),
        }


def _device_acc(store: dict, key: Any, size: int, refs: tuple, like: torch.Tensor | None) -> torch.Tensor:
    """``store[key]``, a zero accumulator of ``size`` made on the first tensor of ``refs`` (else the CPU)
    if missing, and moved to ``like``'s device when the model moved after apply (eagerly only)."""
    acc = store.get(key)
    if acc is not None and like is not None and acc.device != like.device and not torch.compiler.is_compiling():
        acc = store[key] = acc.to(like.device)  # the model moved after apply: follow it
    if acc is None:
        ref = next((v for v in refs if isinstance(v, torch.Tensor)), None)
        device = ref.device if ref is not None else torch.device("cpu")
        acc = store[key] = torch.zeros(size, dtype=_dtype(device), device=device)
    return acc


def _dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def _natural_key(name: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))
