"""``python -m mmskip.zoo.train NAME [--steps N]``: reproduce a zoo model into ``mmskip/zoo/models/NAME``."""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import torch

__all__ = ["RECIPES", "train", "main"]

# name -> (module, function)
RECIPES: dict[str, tuple[str, str]] = {
    "digits-classifier": ("mmskip.zoo.train_classifier", "train_classifier"),
    "digits-vae": ("mmskip.zoo.train_vae", "train_vae"),
    "digits-dit": ("mmskip.zoo.train_dit", "train_dit"),
    "digits-sd": ("mmskip.zoo.train_sd", "train_sd"),
    "digits-clip": ("mmskip.zoo.train_clip", "train_clip"),
    "stdlib-lm": ("mmskip.zoo.train_lm", "train_stdlib_lm"),
}


def train(name: str, out: Path | None = None, steps: int | None = None) -> dict:
    """Run the recipe for ``name`` and write the model folder; returns the measured metrics."""
    from . import MODELS_DIR

    if name not in RECIPES:
        raise KeyError(f"unknown zoo model {name!r}; known: {sorted(RECIPES)}")
    mod, fn = RECIPES[name]
    recipe = getattr(importlib.import_module(mod), fn)
    kwargs = {} if steps is None else {"steps": steps}
    return recipe(Path(out) if out else MODELS_DIR / name, **kwargs)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("name", choices=sorted(RECIPES))
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the package's models/NAME)")
    p.add_argument("--steps", type=int, default=None, help="override the recipe's step count (for smoke tests)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(json.dumps(train(a.name, a.out, a.steps), indent=2))


if __name__ == "__main__":
    main()
