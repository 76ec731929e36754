"""Concurrent use of one applied technique from two threads: detected and refused, never mixed.

A technique's state is per model; :class:`CallGuard` lets one thread's generation or trajectory
run at a time and raises :class:`ConcurrentUseError` for the other thread *before* anything
changes, so every thread is either served correctly or refused.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["CallGuard", "ConcurrentUseError"]


class ConcurrentUseError(RuntimeError):
    """Two threads ran a model with one applied mmskip technique at the same time."""


class CallGuard:
    """Detects concurrent use of one technique's per-model state from two threads.

    A technique's state (the current prompt's skip set, the trajectory's cached features) is
    per model, so two threads generating with one model would mix their calls. ``enter()`` at
    the start of each forward or ``generate`` call (``starts=True`` when the forward starts a new generation or
    trajectory) raises :class:`ConcurrentUseError` when another thread is inside a forward, or
    when this thread continues a generation that another thread has since started. The model
    is never left modified: the error is raised before the forward changes any state.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._lock = threading.Lock()
        self._owner: int | None = None  # thread of the generation / trajectory in progress
        self._inside: dict[int, int] = {}  # thread -> nesting depth of forwards in flight

    def __reduce__(self) -> tuple:
        """A copy (``copy.deepcopy``, pickle) guards its own object: a fresh guard, nobody inside."""
        return (CallGuard, (self.what,))

    def enter(self, starts: bool) -> None:
        me = threading.get_ident()
        with self._lock:
            others = [t for t, n in self._inside.items() if n and t != me]
            if others or (not starts and self._owner not in (None, me)):
                raise ConcurrentUseError(
                    f"two threads are running a model with mmskip {self.what!r} applied at the same time; its "
                    "state is per model. Serialize the calls (e.g. a lock around generate) or give each thread "
                    "its own model copy."
                )
            if starts:
                self._owner = me
            self._inside[me] = self._inside.get(me, 0) + 1

    def exit(self) -> None:
        me = threading.get_ident()
        with self._lock:
            n = self._inside.get(me, 0) - 1
            if n > 0:
                self._inside[me] = n
            else:
                self._inside.pop(me, None)

    @contextmanager
    def call(self, starts: bool) -> Iterator[None]:
        self.enter(starts)
        try:
            yield
        finally:
            self.exit()
