"""Shared by the VLM recipe tests: a two-stage recipe (vision warm-up, then the whole model) that
checkpoints every 2 steps resumes where its checkpoints stop."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

ARGS = {"batch": 2, "device": "cpu", "size": "tiny", "n_eval": 4, "vision_steps": 2, "save_every": 2}


def record_draws(recipe: Any, monkeypatch: Any) -> list[tuple[str, int]]:
    """The (stage, step) of every batch ``recipe``'s stages draw from now on, in order."""
    drawn: list[tuple[str, int]] = []

    def recording(name: str, make: Callable) -> Callable:
        def wrap(*args: Any, **kwargs: Any) -> Callable:
            draw = make(*args, **kwargs)
            return lambda step: drawn.append((name, step)) or draw(step)
        return wrap

    monkeypatch.setattr(recipe, "_vision_draw", recording("vision", recipe._vision_draw))
    monkeypatch.setattr(recipe, "_question_draw", recording("whole", recipe._question_draw))
    return drawn


def assert_resumes(train: Callable[..., dict], drawn: list[tuple[str, int]], out: Path) -> None:
    """4 steps (both stages drawn from the start), then 6: only the 2 new whole-model steps are drawn."""
    m = train(out, steps=4, **ARGS)
    assert drawn == [("vision", 0), ("vision", 1)] + [("whole", s) for s in range(4)]
    assert m["vision warm-up steps"] == 2 and (out / "training" / "whole" / "checkpoint").is_dir()
    drawn.clear()
    train(out, steps=6, **ARGS)
    assert drawn == [("whole", 4), ("whole", 5)]
    drawn.clear()
