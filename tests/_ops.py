"""What a call runs, counted: the aten ops that reach the dispatcher. Tests compare a technique that
has nothing to skip against the plain model op for op (deterministic, unlike a timing)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.ops[str(func.overloadpacket).removeprefix("aten.")] += 1
        return func(*args, **(kwargs or {}))


def op_counts(fn: Callable[[], Any]) -> tuple[Any, Counter[str]]:
    """``fn()``'s result and how many times it ran each aten op (by name, ``aten.`` dropped)."""
    with _Count() as count:
        out = fn()
    return out, count.ops


class CountingBackend:
    """A ``torch.compile`` backend that runs each captured graph eagerly and counts the graphs
    (compilations are deterministic, unlike a timing)."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: Any, example_inputs: list) -> Callable:
        self.graphs += 1
        return gm.forward
