"""The SWIFT draft: the model itself with some attention / MLP sublayers skipped.

Skipping goes through the shared :class:`mmskip._skip_unit.SkipUnitHook`, registered with
``handle.add_hook`` on every unit the draft may skip (a layer's attention, its MLP, and the whole
layer for when both are skipped), so "skip" means what it means for every other technique and
``handle.remove()`` takes it all off. A hook skips only while :meth:`Draft.drafting` is active
*in the thread that entered it*: a verification forward, or a forward another thread runs at the
same time, computes the untouched model.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from .._skip_unit import SkipUnitHook
from ..inject import SkipHandle
from ..registry import DecoderAdapter

__all__ = ["Draft"]


class Draft:
    """What the draft skips now (``attn`` / ``mlp`` layer indices) and the hooks that skip it."""

    def __init__(self, adapter: DecoderAdapter, handle: SkipHandle, layers: Iterable[int]) -> None:
        self.adapter = adapter
        self.attn: frozenset[int] = frozenset()
        self.mlp: frozenset[int] = frozenset()
        self.both: frozenset[int] = frozenset()  # layers whose two sublayers are skipped: the whole layer is
        self._thread: int | None = None  # the thread inside drafting(), if any
        for i in sorted(set(layers)):
            handle.add_hook(adapter.unit("layer", i), SkipUnitHook(adapter, "layer", i, self._when(self._both, i)), ".draft")
            handle.add_hook(adapter.unit("attn", i), SkipUnitHook(adapter, "attn", i, self._when(self._attn, i)), ".draft")
            handle.add_hook(adapter.unit("mlp", i), SkipUnitHook(adapter, "mlp", i, self._when(self._mlp, i)), ".draft")

    def _both(self) -> frozenset[int]:
        return self.both

    def _attn(self) -> frozenset[int]:
        return self.attn

    def _mlp(self) -> frozenset[int]:
        return self.mlp

    def _when(self, current, i: int):  # noqa: ANN001, ANN202
        def when() -> bool:
            return self._thread is not None and i in current() and self._thread == threading.get_ident()

        return when

    def set(self, attn: Iterable[int], mlp: Iterable[int]) -> None:
        self.attn, self.mlp = frozenset(attn), frozenset(mlp)
        self.both = self.attn & self.mlp

    @property
    def sets(self) -> tuple[frozenset[int], frozenset[int]]:
        return self.attn, self.mlp

    @contextmanager
    def drafting(self) -> Iterator[None]:
        """Forwards this thread runs inside the block skip the draft's sublayers."""
        self._thread = threading.get_ident()
        try:
            yield
        finally:
            self._thread = None

    @contextmanager
    def using(self, attn: Iterable[int], mlp: Iterable[int]) -> Iterator[None]:
        """Draft with another layer set for the block (a search trial), then restore the current one."""
        saved = self.sets
        self.set(attn, mlp)
        try:
            with self.drafting():
                yield
        finally:
            self.set(*saved)
