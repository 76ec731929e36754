"""Which denoising step a denoiser call belongs to, seen from inside the model.

Step indices always live in ONE index space: the pipeline's ``num_inference_steps`` grid (the
user's step numbers, 0 = the noisiest step). A drop-in pipeline calls
:meth:`StepTracker.begin` with the grid size and the grid steps the sampler will visit (step
skipping and the Gaussian teleport visit a subset), so the k-th visited step is grid step
``visited[k]``. Without a pipeline the tracker counts steps itself from each call's timestep
and conditioning:

* every call carries a *key*, a fingerprint of its conditioning inputs (prompt embeddings,
  class labels, ...: every tensor input but the latent and the timestep); calls of one step
  with different conditioning (a pipeline running the conditional and unconditional branches
  separately) are separate *slots* with separate caches;
* a larger timestep than the last call's starts a new trajectory; so does a call at the same
  timestep whose key this step has already seen (a new generation restarted at the same first
  timestep, e.g. after a 1-step or an interrupted call); a smaller timestep is the next step.

A restart that the rules cannot see (the same conditioning, at a timestep below the
interrupted call's last one) continues the old trajectory's step count; its features are
still never reused across different conditioning. Call ``handle.state.reset()`` between such
calls, or use a drop-in pipeline (``mmskip.pipelines``), which marks every call's start.

Whose calls a technique sees: a drop-in pipeline attaches its techniques to a denoiser that
other pipelines may share, for one call. It attaches them inside :func:`serving_this_thread`,
which binds them to its thread: calls of the denoiser from any other thread (a plain diffusers
pipeline on the same ``unet``) pass through their hooks untouched (:func:`serves`), so they
compute what the unhooked model computes and never read or change the call's state. The check
runs in eager code; inside a ``torch.compile``d denoiser it is not made (it would break the
graph), so do not run a compiled denoiser from two pipelines at the same time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

__all__ = ["StepTracker", "call_key", "CallKeyMemo", "DeferredKey", "serving_this_thread", "bound_thread", "serves"]

logger = logging.getLogger(__name__)

_SERVING: ContextVar[int | None] = ContextVar("mmskip_diffusion_serving", default=None)


@contextmanager
def serving_this_thread() -> Iterator[None]:
    """Techniques attached inside this block act only on this thread's denoiser calls (see the
    module docstring); drop-in pipelines attach their per-call techniques in it."""
    token = _SERVING.set(threading.get_ident())
    try:
        yield
    finally:
        _SERVING.reset(token)


def bound_thread() -> int | None:
    """The thread a technique attached now is bound to (``None``: not bound, every call counts)."""
    return _SERVING.get()


def serves(thread: int | None) -> bool:
    """Whether the running denoiser call is one a technique bound to ``thread`` acts on. Checked
    in eager code only: inside a ``torch.compile``d graph it is always True (no graph break)."""
    if torch.compiler.is_compiling() or thread is None:
        return True
    return thread == threading.get_ident()


class StepTracker:
    """Grid step index, call slot within the step, and the number of grid steps when known."""

    def __init__(self) -> None:
        self.visit = -1  # index of the visited step in this trajectory
        self.slot: Hashable = 0
        self.last_t: float | None = None
        self.num_steps: int | None = None
        self.visited: tuple[int, ...] | None = None
        self.trajectory = 0
        self.first_call_of_step = True
        self._keys_this_step: list[Hashable] = []
        self._pending_begin = False

    @property
    def step(self) -> int:
        """The grid step of the current call (``visited[visit]`` when the pipeline said)."""
        if self.visited is not None and 0 <= self.visit < len(self.visited):
            return self.visited[self.visit]
        return self.visit

    def begin(self, num_steps: int | None = None, visited: Sequence[int] | None = None) -> None:
        """Start a new trajectory on a ``num_steps`` grid that visits grid steps ``visited`` (sorted).

        Called by pipelines before sampling; ``visited=None`` means every grid step.
        """
        if num_steps is not None and num_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
        if visited is not None:
            visited = tuple(int(v) for v in visited)
            if num_steps is not None and any(not 0 <= v < num_steps for v in visited):
                raise ValueError(f"visited steps {visited} must lie in 0..{num_steps - 1}")
        self.num_steps = num_steps
        self.visited = visited
        self.last_t = None
        self._pending_begin = True

    def reset(self) -> None:
        """Forget the trajectory in progress: the next call starts a new one."""
        self.num_steps = None
        self.visited = None
        self.last_t = None
        self._pending_begin = True

    def starts_new(self, t: float | None, key: Hashable) -> bool:
        """Whether a call at timestep ``t`` with conditioning ``key`` would start a new trajectory."""
        if self._pending_begin or self.last_t is None:
            return True
        if t is not None and t > self.last_t:
            return True
        same_step = t is None or t == self.last_t
        return same_step and key in self._keys_this_step and t is not None

    def observe(self, t: float | None, key: Hashable = 0) -> bool:
        """Advance on a call at timestep ``t``; returns True when a new trajectory starts."""
        new_traj = self.starts_new(t, key)
        if new_traj:
            if not self._pending_begin:
                self.num_steps, self.visited = None, None  # a restart the pipeline did not announce
            self._pending_begin = False
            self.trajectory += 1
            self.visit = 0
            self._keys_this_step = []
        elif t is None or t < self.last_t:
            self.visit += 1
            self._keys_this_step = []
        self.first_call_of_step = not self._keys_this_step
        if key not in self._keys_this_step:
            self._keys_this_step.append(key)
        self.slot = key
        self.last_t = t
        return new_traj


class DeferredKey:
    """A call's key (:func:`call_key`), computed only when the tracker compares it: the tracker
    compares keys only of calls at one timestep (the branches of one step, a restart), so along a
    trajectory of one call per step no fingerprint is computed (no device sync). For a technique
    that keeps nothing per conditioning (the key is never hashed as a cache slot). Holds the
    call's inputs until the tracker drops the key (the next step)."""

    __slots__ = ("_compute", "_value")

    def __init__(self, compute: Callable[[], Hashable]) -> None:
        self._compute: Callable[[], Hashable] | None = compute
        self._value: Hashable = None

    @property
    def value(self) -> Hashable:
        if self._compute is not None:
            self._value, self._compute = self._compute(), None
        return self._value

    def __eq__(self, other: object) -> bool:
        return self.value == (other.value if isinstance(other, DeferredKey) else other)

    def __hash__(self) -> int:
        return hash(self.value)


# Keyword inputs that change every step without being new conditioning: ControlNet / T2I-Adapter
# residuals and block samples (``down_block_additional_residuals``, ``controlnet_block_samples``, ...).
_PER_STEP_WORDS = ("controlnet", "additional_residual")


def call_key(args: tuple, kwargs: dict, skip_args: Sequence[int], skip_kwargs: Sequence[str]) -> Hashable:
    """A fingerprint of a call's conditioning: every input except the positional ``skip_args``,
    the keyword ``skip_kwargs`` (the latent and the timestep) and per-step control inputs (a
    ControlNet's residuals, which depend on the timestep and are added fresh to inherited features).

    Shapes, dtypes and three value sums per tensor (one device sync per call); two calls with
    the same conditioning get the same key, different prompts / labels get different keys.
    """
    tensors: list[torch.Tensor] = []
    meta: list[Any] = []

    def visit(x: Any, name: str) -> None:
        if isinstance(x, torch.Tensor):
            meta.append((name, tuple(x.shape), str(x.dtype)))
            if x.numel():
                v = x.detach().flatten().double()
                w = torch.arange(1, v.numel() + 1, device=v.device, dtype=v.dtype).remainder_(7).add_(1)
                tensors.append(torch.stack([v.sum(), v.abs().sum(), (v * w).sum()]))
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                visit(x[k], f"{name}.{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                visit(v, f"{name}.{i}")
        elif isinstance(x, (int, float, str, bool)) or x is None:
            meta.append((name, x))

    for i, a in enumerate(args):
        if i not in skip_args:
            visit(a, str(i))
    for k in sorted(kwargs):
        if k not in skip_kwargs and not any(w in k for w in _PER_STEP_WORDS):
            visit(kwargs[k], k)
    values = tuple(torch.cat(tensors).tolist()) if tensors else ()
    return (tuple(meta), values)


def _conditioning(args: tuple, kwargs: dict, skip_args: Sequence[int], skip_kwargs: Sequence[str]
                  ) -> list[Any] | None:
    """What :func:`call_key` fingerprints, as (name, value) leaves: the tensors themselves (not
    their values) and the plain values; ``None`` when a tensor has no version counter (inference
    mode), so that an in-place change could not be seen."""
    leaves: list[Any] = []

    def visit(x: Any, name: str) -> bool:
        if isinstance(x, torch.Tensor):
            if x.is_inference():
                return False
            leaves.append((name, x, x._version))
        elif isinstance(x, dict):
            return all(visit(x[k], f"{name}.{k}") for k in sorted(x, key=str))
        elif isinstance(x, (list, tuple)):
            return all(visit(v, f"{name}.{i}") for i, v in enumerate(x))
        elif isinstance(x, (int, float, str, bool)) or x is None:
            leaves.append((name, x))
        return True

    ok = all(visit(a, str(i)) for i, a in enumerate(args) if i not in skip_args)
    ok = ok and all(visit(kwargs[k], k) for k in sorted(kwargs)
                    if k not in skip_kwargs and not any(w in k for w in _PER_STEP_WORDS))
    return leaves if ok else None


def _same_leaves(a: list[Any], b: list[Any]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if len(x) != len(y) or x[0] != y[0]:
            return False
        if len(x) == 3:  # a tensor: the same object, unchanged since (its version counter)
            if x[1] is not y[1] or x[2] != y[2]:
                return False
        elif type(x[1]) is not type(y[1]) or x[1] != y[1]:
            return False
    return True


class CallKeyMemo:
    """:func:`call_key` of the last call, reused while calls pass the very same conditioning.

    A pipeline passes one prompt-embedding / class-label tensor to every step of a trajectory;
    its fingerprint (value sums read on the host: a device sync, and most of the per-call
    bookkeeping on a small model) is computed again only when a conditioning input is another
    tensor object, was changed in place (its version counter moved) or a plain input differs.
    Holds the last call's conditioning tensors until :meth:`clear` or the next call. A change
    that bypasses version counters (writes through ``.data``) is not seen; tensors made in
    inference mode have no counter and are fingerprinted on every call.
    """

    __slots__ = ("_leaves", "_key")

    def __init__(self) -> None:
        self._leaves: list[Any] | None = None
        self._key: Hashable = None

    def key(self, args: tuple, kwargs: dict, skip_args: Sequence[int], skip_kwargs: Sequence[str]) -> Hashable:
        """The call's :func:`call_key`, from the memo when the conditioning is unchanged."""
        leaves = _conditioning(args, kwargs, skip_args, skip_kwargs)
        if leaves is not None and self._leaves is not None and _same_leaves(leaves, self._leaves):
            return self._key
        key = call_key(args, kwargs, skip_args, skip_kwargs)
        self._leaves, self._key = leaves, key
        return key

    def clear(self) -> None:
        """Forget the last call (and drop the references to its tensors)."""
        self._leaves, self._key = None, None
