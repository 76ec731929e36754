"""``mmskip zoo NAME [--steps N] [--out DIR | --overwrite-shipped]``: reproduce a zoo model.

Recipes that support it (``digits-llava``, ``digits-video``) also take ``--device cuda`` and ``--batch N``
(``digits-florence`` takes ``--batch N``; it trains on the CPU).

By default the model is written to a new folder, ``runs/zoo/NAME`` (under the current directory),
so a rerun never replaces the models shipped in the package. To refresh the shipped model in
``mmskip/zoo/models/NAME`` pass ``--overwrite-shipped`` (or name that folder with ``--out``).
The recipes ship with the repository, not with the installed package: run them from a clone
(``python -m recipes`` in its root is an alias).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmskip.cli import ArgumentParser, UsageError, positive_int, run, writable_dir

__all__ = ["RECIPES", "DEFAULT_RUNS_DIR", "UnsupportedOption", "recipe_for", "train", "output_folder", "parse_args", "main"]

# name -> (module, function); a module starting with "." is a recipe here (recipes/), else an absolute import
RECIPES: dict[str, tuple[str, str]] = {
    "digits-classifier": (".classifier", "train_classifier"),
    "digits-vae": (".vae", "train_vae"),
    "digits-dit": (".dit", "train_dit"),
    "digits-sd": (".sd", "train_sd"),
    "digits-clip": (".clip", "train_clip"),
    "stdlib-lm": (".stdlib_lm", "train_stdlib_lm"),
    "stdlib-lm-skip": (".stdlib_lm_skip", "train_stdlib_lm_skip"),
    "digits-llava": (".llava", "train_llava"),
    "digits-video": (".video", "train_video"),
    "digits-florence": (".florence", "train_florence"),
    "scenes-vae": (".scenes_vae", "train_scenes_vae"),
    "scenes-flux": (".scenes_flux", "train_scenes_flux"),
    "scenes-classifier": (".scenes_classifier", "train_scenes_classifier"),
    "digits-sd-assembled": ("mmskip.diffusion.assembly.recipe", "assemble_digits_sd"),
    "scenes-flux-controlnet": ("mmskip.diffusion.relactrl.recipe", "train_scenes_controlnet"),
    "scenes-flux-relactrl": ("mmskip.diffusion.relactrl.recipe", "train_scenes_relactrl"),
}
DEFAULT_RUNS_DIR = Path("runs") / "zoo"


class UnsupportedOption(ValueError):
    """An option (``--device``, ``--batch``, ``--steps``) that the chosen recipe does not take."""


def output_folder(name: str, out: str | Path | None = None, overwrite_shipped: bool = False) -> Path:
    """Where ``train`` writes ``name``: ``out`` if given, the package's ``models/NAME`` with
    ``overwrite_shipped``, else ``runs/zoo/NAME``."""
    from mmskip.zoo import MODELS_DIR

    if out is not None and overwrite_shipped:
        raise ValueError("give either out or overwrite_shipped, not both")
    if out is not None:
        return Path(out)
    return MODELS_DIR / name if overwrite_shipped else DEFAULT_RUNS_DIR / name


def recipe_for(name: str, steps: int | None = None, device: str | None = None,
               batch: int | None = None) -> tuple[Callable[..., dict], dict[str, Any]]:
    """The recipe function for ``name`` and the options given for it (those not ``None``);
    raises :class:`UnsupportedOption` for one the recipe does not take."""
    if name not in RECIPES:
        raise ValueError(f"unknown zoo model {name!r}; known: {', '.join(sorted(RECIPES))}")
    mod, fn = RECIPES[name]
    try:
        recipe = getattr(importlib.import_module(mod, __package__), fn)
    except ModuleNotFoundError as e:  # the recipes use the digits data, open_clip, torchmetrics
        from mmskip.optional_deps import missing_extra

        err = missing_extra(e, f"training {name!r}")
        if err is None:
            raise
        raise err from e
    kwargs = {k: v for k, v in {"steps": steps, "device": device, "batch": batch}.items() if v is not None}
    params = inspect.signature(recipe).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unsupported = [k for k in kwargs if k not in params and not takes_any]
    if unsupported:
        raise UnsupportedOption(f"the {name!r} recipe does not take {', '.join('--' + k for k in unsupported)}; "
                                "leave it out")
    return recipe, kwargs


def train(name: str, out: Path | None = None, steps: int | None = None, overwrite_shipped: bool = False,
          device: str | None = None, batch: int | None = None) -> dict:
    """Run the recipe for ``name`` and write the model folder (see :func:`output_folder`);
    returns the measured metrics. ``device``/``batch`` are passed only to recipes that take them."""
    recipe, kwargs = recipe_for(name, steps, device, batch)
    folder = output_folder(name, out, overwrite_shipped)
    try:
        return recipe(folder, **kwargs)
    except ModuleNotFoundError as e:  # the recipes use the digits data, open_clip, torchmetrics
        from mmskip.optional_deps import missing_extra

        err = missing_extra(e, f"training {name!r}")
        if err is None:
            raise
        raise err from e


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="mmskip zoo", description=__doc__.split("\n\n")[0],
                       epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("name", choices=sorted(RECIPES))
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", type=writable_dir, default=None,
                       help=f"output folder (default: {DEFAULT_RUNS_DIR}/NAME, never the shipped model)")
    where.add_argument("--overwrite-shipped", action="store_true",
                       help="write into the package's mmskip/zoo/models/NAME, replacing the shipped model")
    p.add_argument("--steps", type=positive_int, default=None, help="override the recipe's step count (for smoke tests)")
    p.add_argument("--device", default=None, help="e.g. cuda (recipes that support it; default: the recipe's, CPU)")
    p.add_argument("--batch", type=positive_int, default=None, help="override the recipe's batch size (recipes that support it)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1: the recipes' setting)")
    a = p.parse_args(argv)
    a.folder = output_folder(a.name, a.out, a.overwrite_shipped)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    try:
        recipe_for(a.name, a.steps, a.device, a.batch)  # an option the recipe does not take: before any work
    except UnsupportedOption as e:
        raise UsageError(str(e)) from None
    print(f"training {a.name} into {a.folder}")
    print(json.dumps(train(a.name, a.folder, a.steps, device=a.device, batch=a.batch), indent=2))
    return 0


if __name__ == "__main__":  # python -m recipes.zoo from a clone's root
    sys.exit(run("zoo", main))
