"""The SWIFT draft: the model itself with some attention / MLP sublayers skipped.

Skipping goes through the shared :class:`mmskip._skip_unit.SkipUnitHook`, registered with
``handle.add_hook`` on every unit the draft may skip (a layer's attention, its MLP, and the whole
layer for when both are skipped), so "skip" means what it means for every other technique and
``handle.remove()`` takes it all off. A hook skips only while :meth:`Draft.drafting` is active
*in the thread that entered it*: a verification forward, or a forward another thread runs at the
same time, computes the untouched model. Which thread drafts is a ``threading.local`` flag, not a
thread id: ``torch.compile`` traces the read and guards on it, and a guard reads the calling
thread's own flag, so a compiled forward (``fullgraph=True`` included) drafts only in the thread
that drafts, with one graph for drafting and one for the full model.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from .._skip_unit import SkipUnitHook
from ..inject import SkipHandle
from ..registry import DecoderAdapter

__all__ = ["Draft"]


class _Drafting(threading.local):
    """Whether the calling thread is inside :meth:`Draft.drafting` (each thread sees its own)."""

    def __init__(self) -> None:
        self.active = False

    def __reduce__(self) -> tuple:
        """A copy (``copy.deepcopy``, pickle) starts with no thread drafting."""
        return (_Drafting, ())


class Draft:
    """What the draft skips now (``attn`` / ``mlp`` layer indices) and the hooks that skip it."""

    def __init__(self, adapter: DecoderAdapter, handle: SkipHandle, layers: Iterable[int]) -> None:
        self.adapter = adapter
        self.attn: frozenset[int] = frozenset()
        self.mlp: frozenset[int] = frozenset()
        self.both: frozenset[int] = frozenset()  # layers whose two sublayers are skipped: the whole layer is
        self._local = _Drafting()  # per thread: inside drafting()?
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
            return self._local.active and i in current()

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
        outer, self._local.active = self._local.active, True
        try:
            yield
        finally:
            self._local.active = outer

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
