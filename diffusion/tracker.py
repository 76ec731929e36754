"""Which denoising step a denoiser call belongs to, seen from inside the model.

A root hook on the denoiser reads each call's ``timestep``: a smaller timestep than the last
one starts the next step, an equal one is another call of the same step (pipelines that run
the conditional and unconditional branches separately), a larger one starts a new trajectory.
Drop-in pipelines also call :meth:`StepTracker.begin` with the number of inference steps.
"""

from __future__ import annotations

from typing import Any

from diffusers.hooks import ModelHook

__all__ = ["StepTracker", "TrackerHook"]


class StepTracker:
    """Step index, call slot within the step, and the number of steps when known."""

    def __init__(self) -> None:
        self.step = -1
        self.slot = 0
        self.last_t: float | None = None
        self.num_steps: int | None = None
        self.trajectory = 0
        self._pending_begin = False

    def begin(self, num_steps: int | None = None) -> None:
        """Start a new trajectory of ``num_steps`` denoising steps (called by pipelines)."""
        if num_steps is not None and num_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
        self.num_steps = num_steps
        self.last_t = None
        self.step = -1
        self._pending_begin = True

    def observe(self, t: float | None) -> bool:
        """Advance on a call at timestep ``t``; returns True when a new trajectory starts."""
        new_traj = False
        if self._pending_begin or self.last_t is None or (t is not None and t > self.last_t):
            new_traj = True
            self._pending_begin = False
            self.trajectory += 1
            self.step, self.slot = 0, 0
        elif t is None or t < self.last_t:
            self.step += 1
            self.slot = 0
        else:  # same timestep: another call within the same step
            self.slot += 1
        self.last_t = t
        return new_traj


class TrackerHook(ModelHook):
    """Root hook: updates the tracker and lets the technique decide before any block runs."""

    def __init__(self, tracker: StepTracker, timestep: Any, on_call: Any, on_new: Any) -> None:
        super().__init__()
        self.tracker = tracker
        self._timestep = timestep
        self._on_call = on_call
        self._on_new = on_new

    def pre_forward(self, module: Any, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        if self.tracker.observe(self._timestep(args, kwargs)):
            self._on_new()
        self._on_call(args, kwargs)
        return args, kwargs
