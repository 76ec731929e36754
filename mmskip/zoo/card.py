"""Model cards: the README.md written next to each zoo model's weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["write_card"]


def write_card(folder: Path, name: str, summary: str, data: str, recipe: str, metrics: dict[str, Any],
               wall_time_s: float, extra: str = "", hardware: str | None = None, reproduce: str = "") -> None:
    """Write ``README.md`` (human-readable card) and ``metrics.json`` into ``folder``; ``hardware`` names
    what trained it (default: one CPU thread), ``reproduce`` extra arguments of the training command."""
    folder = Path(folder)
    where = hardware or "one thread of a 2-core Xeon CPU (no GPU)"
    how = "fixed seeds" + ("" if hardware else "; 1 CPU thread")
    rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in metrics.items())
    text = f"""# {name}

{summary}

Reproduce: `mmskip zoo {name}{reproduce}` ({how}).

## Data
{data}

## Recipe
{recipe}

Training wall time: {wall_time_s / 60:.1f} min on {where}.

## Metrics (measured by the recipe, held-out split)
| metric | value |
|---|---|
{rows}
{extra}
"""
    (folder / "README.md").write_text(text)
    (folder / "metrics.json").write_text(json.dumps({"metrics": metrics, "wall_time_s": wall_time_s}, indent=2) + "\n")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
