"""``mmskip`` command line: one entry point, a subcommand per job.

    mmskip demo [--only language]            the headless demo on the zoo's models (apps/demo.py)
    mmskip app [--port N] [--share]          the Gradio app (apps/app.py)
    mmskip bench NAME [args] | bench --list  a benchmark script from benchmarks/
    mmskip eval images|lm ...                quality and time with and without a config
    mmskip analyze --model M --text F        depth-efficiency analysis of a language model
    mmskip train --objective ...             skip-aware training (mmskip.train)
    mmskip zoo NAME                          reproduce a zoo model (recipes/zoo.py)
    mmskip tune --model M --floor psnr=35    the fastest configuration under a quality floor

Each subcommand lives in its own module (or script) with a ``main(argv)``; this file only
dispatches, and imports nothing heavy (no torch), so ``mmskip --help`` answers at once. The
``python -m`` entry points (``mmskip.eval``, ``mmskip.train``, ...) stay as aliases.

User errors are one line and exit status 2, never a traceback: the subcommands parse with
:class:`ArgumentParser` (argparse whose errors are one line) and :data:`type=` validators
(:func:`positive_int`, :func:`writable_file`, ...) that refuse bad values before any work, and
raise :class:`UsageError` for inputs found wrong later (a model folder that is not a model);
:func:`run` prints it as ``mmskip CMD: error: ...``. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import math
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

__all__ = ["main", "run", "usage", "benchmarks", "describe_benchmark", "recipe", "UsageError", "ArgumentParser",
           "positive_int", "non_negative_int", "positive_float", "non_negative_float", "fraction", "proper_fraction", "at_least",
           "writable_file", "writable_dir", "existing_file"]

_REPO = Path(__file__).resolve().parents[1]  # apps/, benchmarks/, recipes/ ship with the repository, not the wheel
_RECIPES = "mmskip_recipes"  # the name recipes/ is imported under (see recipe())

# name -> (module, "script:<folder>/<file>" or "recipe:<module in recipes/>", one-line help)
_COMMANDS = {
    "demo": ("script:apps/demo.py", "the headless demo on the zoo's models (what `bash run.sh demo` runs)"),
    "app": ("script:apps/app.py", "the Gradio app on 127.0.0.1:7860 (needs the app extra)"),
    "bench": ("bench", "run a benchmark script from benchmarks/ (`mmskip bench --list`)"),
    "eval": ("mmskip.eval.__main__", "quality and time of a model with and without an mmskip config"),
    "analyze": ("mmskip.analysis.cli", "depth-efficiency analysis of a language model on a text file"),
    "train": ("mmskip.train.__main__", "skip-aware training: schedule-aware, layer dropout, early exits, LoRA"),
    "zoo": ("recipe:zoo", "reproduce a zoo model with its recipe (recipes/, from a clone)"),
    "tune": ("mmskip.tuning.cli", "the fastest configuration that keeps a quality floor, measured here (mmskip.tune)"),
}


class UsageError(Exception):
    """A user error in a command's arguments or inputs (a missing model, a bad config file).

    :func:`run` prints it as one line, ``PROG: error: MESSAGE``, and exits with status 2. The
    message says what is wrong and what to do. Raise it only for what the user can fix.

    Args:
        message: what is wrong and what to do.
        prog: the command to name (default ``mmskip CMD``), e.g. ``"mmskip eval lm"``.
    """

    def __init__(self, message: str, prog: str | None = None) -> None:
        super().__init__(message)
        self.prog = prog


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``PROG: error: MESSAGE (`PROG --help` lists the options)``,
    and exit status 2 (argparse prints its whole usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


# -- argparse type= validators: a bad value is refused by the parser, before any work -----------------------


def _number(text: str, kind: type, what: str, ok: Callable[[float], bool]) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"{text} is not {what}")
    return value


def positive_int(text: str) -> int:
    """A whole number >= 1 (counts, steps, sizes)."""
    return _number(text, int, "a whole number >= 1", lambda v: v >= 1)


def non_negative_int(text: str) -> int:
    """A whole number >= 0 (0 meaning off or the default, as the option's help says)."""
    return _number(text, int, "a whole number >= 0", lambda v: v >= 0)


def at_least(low: int) -> Callable[[str], int]:
    """A validator for a whole number >= ``low``."""

    def check(text: str) -> int:
        return _number(text, int, f"a whole number >= {low}", lambda v: v >= low)

    check.__name__ = f"int>={low}"
    return check


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _number(text, float, "a number > 0", lambda v: v > 0)


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    return _number(text, float, "a number >= 0", lambda v: v >= 0)


def fraction(text: str) -> float:
    """A number from 0 to 1."""
    return _number(text, float, "a number from 0 to 1", lambda v: 0 <= v <= 1)


def proper_fraction(text: str) -> float:
    """A number from 0 up to, but not including, 1."""
    return _number(text, float, "a number >= 0 and < 1", lambda v: 0 <= v < 1)


def existing_file(text: str) -> Path:
    """A file that exists."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file" if not path.exists() else f"{text} is not a file")
    return path


def _probe(path: Path, folder: bool) -> None:
    """Create what is missing of ``path`` (a file, or a folder), prove it can be written, and remove
    what the probe created; raises ``OSError`` when it cannot be written."""
    parent = path if folder else path.parent
    missing = [p for p in (parent, *parent.parents) if not p.exists()][::-1]
    created: list[Path] = []
    try:
        for d in missing:
            d.mkdir()
            created.append(d)
        if folder:
            fd, tmp = tempfile.mkstemp(dir=path, prefix=".mmskip-probe-")
            os.close(fd)
            os.unlink(tmp)
        elif path.is_dir():
            raise IsADirectoryError(21, "it is a folder; name a file in it", str(path))
        else:
            existed = path.exists()
            with open(path, "a"):
                pass
            if not existed:
                path.unlink()
    finally:
        for d in reversed(created):
            d.rmdir()


def _writable(text: str, folder: bool) -> Path:
    path = Path(text).expanduser()
    try:
        _probe(path, folder)
    except OSError as e:
        blocker = next((p for p in (path, *path.parents) if p.exists()), None)
        if blocker is not None and blocker != path and not blocker.is_dir():
            why = f"{blocker} is a file, not a folder"
        else:
            why = e.strerror or str(e)
        raise argparse.ArgumentTypeError(f"cannot write {text} ({why}); pass a path in a folder you can write to") \
            from None
    return path


def writable_file(text: str) -> Path:
    """An output file that can be written (checked now, before any work; missing folders are fine)."""
    return _writable(text, folder=False)


def writable_dir(text: str) -> Path:
    """An output folder that can be written (checked now, before any work; it may not exist yet)."""
    return _writable(text, folder=True)


# -- dispatch -------------------------------------------------------------------------------------------------


def usage() -> str:
    lines = [f"  {name:<10} {help_}" for name, (_, help_) in _COMMANDS.items()]
    return "usage: mmskip COMMAND [args]\n\ncommands:\n" + "\n".join(lines) + "\n\n`mmskip COMMAND --help` for its options"


def run(command: str, main_fn: Callable[[list[str]], Any], argv: list[str] | None = None) -> int:
    """Run a subcommand's ``main(argv)``: a :class:`UsageError` becomes one line on stderr and status 2.

    The ``python -m`` aliases call this too, so they report errors the same way.
    """
    try:
        result = main_fn(list(sys.argv[1:] if argv is None else argv))
    except UsageError as e:
        print(f"{e.prog or 'mmskip ' + command}: error: {e}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


def _script(relative: str) -> ModuleType:
    path = _REPO / relative
    if not path.is_file():
        raise UsageError(f"{relative} ships with the mmskip repository, not with the installed package; "
                         "run this command from a clone (pip install -e .)")
    spec = importlib.util.spec_from_file_location(f"mmskip_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # scripts import their siblings (benchmarks share runners)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def recipe(name: str) -> ModuleType:
    """``recipes/<name>.py`` of this clone, imported as ``mmskip_recipes.<name>``.

    The recipes that train the zoo's models ship with the repository, not the installed package:
    the package ``recipes/`` is imported from its path (once, under one name, so recipes import
    each other relatively and every caller sees the same modules). Raises :class:`UsageError`
    outside a clone.
    """
    if _RECIPES not in sys.modules:
        init = _REPO / "recipes" / "__init__.py"
        if not init.is_file():
            raise UsageError("recipes/ ships with the mmskip repository, not with the installed package; "
                             "run this command from a clone (pip install -e .)")
        spec = importlib.util.spec_from_file_location(_RECIPES, init, submodule_search_locations=[str(init.parent)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[_RECIPES] = package
        try:
            spec.loader.exec_module(package)
        except BaseException:
            del sys.modules[_RECIPES]
            raise
    return importlib.import_module(f"{_RECIPES}.{name}")


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def benchmarks() -> list[str]:
    """Names ``mmskip bench`` runs: the scripts in ``benchmarks/`` that define ``main`` (read with
    ``ast``, not imported; the others are modules the scripts share)."""
    folder = _REPO / "benchmarks"
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.py")
                  if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in _parse(p).body))


def describe_benchmark(name: str) -> str:
    """The first sentence of benchmark ``name``'s module docstring (read with ``ast``, not imported)."""
    doc = ast.get_docstring(_parse(_REPO / "benchmarks" / f"{name}.py")) or ""
    first = " ".join(doc.strip().split("\n\n")[0].split()).replace("``", "`")
    return first.split(". ")[0].rstrip(".") or "(no docstring)"


def _bench(argv: list[str]) -> int:
    names = benchmarks()
    if not argv or argv[0] in ("-h", "--help", "--list"):
        width = max((len(n) for n in names), default=0)
        print("usage: mmskip bench NAME [args]   (`mmskip bench NAME --help` for a script's options)\n\nbenchmarks:\n"
              + "\n".join(f"  {n:<{width}}  {describe_benchmark(n)}" for n in names))
        return 0
    if argv[0] not in names:
        raise UsageError(f"unknown benchmark {argv[0]!r}; choose one of: {', '.join(names) or '(none here)'} "
                         "(`mmskip bench --list` describes them)")
    _script(f"benchmarks/{argv[0]}.py").main(argv[1:])
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv or argv[0] not in _COMMANDS:
        print(usage(), file=sys.stderr)
        what = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"mmskip: error: {what}; choose one of: {', '.join(_COMMANDS)} "
              "(`mmskip COMMAND --help` for its options)", file=sys.stderr)
        return 2
    command, target = argv[0], _COMMANDS[argv[0]][0]
    if target == "bench":
        return run(command, _bench, argv[1:])

    def dispatch(args: list[str]) -> Any:
        if target.startswith("script:"):
            module = _script(target[len("script:"):])
        elif target.startswith("recipe:"):
            module = recipe(target[len("recipe:"):])
        else:
            module = importlib.import_module(target)
        return module.main(args)

    return run(command, dispatch, argv[1:])


if __name__ == "__main__":  # python -m mmskip.cli: run the imported module, whose UsageError the subcommands raise
    from mmskip.cli import main as _main

    sys.exit(_main())
