"""``mmskip`` command line: one entry point, a subcommand per job.

    mmskip demo [--only language]            the headless demo on the zoo's models (apps/demo.py)
    mmskip app [--port N] [--share]          the Gradio app (apps/app.py)
    mmskip bench NAME [args] | bench --list  a benchmark script from benchmarks/
    mmskip eval images|lm ...                quality and time with and without a config
    mmskip analyze --model M --text F        depth-efficiency analysis of a language model
    mmskip train --objective ...             skip-aware training (mmskip.train)
    mmskip zoo NAME                          reproduce a zoo model (mmskip.zoo.train)

Each subcommand lives in its own module (or script) with a ``main(argv)``; this file only
dispatches. The ``python -m`` entry points (``mmskip.eval``, ``mmskip.train``, ...) stay as aliases.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_REPO = Path(__file__).resolve().parents[1]  # apps/ and benchmarks/ ship with the repository, not the wheel

# name -> (module, or "script:<folder>/<file>", one-line help)
_COMMANDS = {
    "demo": ("script:apps/demo.py", "the headless demo on the zoo's models (what `bash run.sh demo` runs)"),
    "app": ("script:apps/app.py", "the Gradio app on 127.0.0.1:7860 (needs the app extra)"),
    "bench": ("bench", "run a benchmark script from benchmarks/ (`mmskip bench --list`)"),
    "eval": ("mmskip.eval.__main__", "quality and time of a model with and without an mmskip config"),
    "analyze": ("mmskip.analysis.cli", "depth-efficiency analysis of a language model on a text file"),
    "train": ("mmskip.train.__main__", "skip-aware training: schedule-aware, layer dropout, early exits, LoRA"),
    "zoo": ("mmskip.zoo.train", "reproduce a zoo model with its recipe"),
}


def usage() -> str:
    lines = [f"  {name:<10} {help_}" for name, (_, help_) in _COMMANDS.items()]
    return "usage: mmskip COMMAND [args]\n\ncommands:\n" + "\n".join(lines) + "\n\n`mmskip COMMAND --help` for its options"


def _script(relative: str) -> ModuleType:
    path = _REPO / relative
    if not path.is_file():
        raise FileNotFoundError(f"{relative} ships with the mmskip repository, not with the installed package; "
                                "run this command from a clone (pip install -e .)")
    spec = importlib.util.spec_from_file_location(f"mmskip_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # scripts import their siblings (benchmarks share runners)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def benchmarks() -> list[str]:
    """Names ``mmskip bench`` runs: the scripts in ``benchmarks/``."""
    return sorted(p.stem for p in (_REPO / "benchmarks").glob("*.py")) if (_REPO / "benchmarks").is_dir() else []


def _bench(argv: list[str]) -> int:
    names = benchmarks()
    if not argv or argv[0] in ("-h", "--help", "--list"):
        print("usage: mmskip bench NAME [args]   (`mmskip bench NAME --help` for a script's options)\n\nbenchmarks:\n"
              + "\n".join(f"  {n}" for n in names))
        return 0
    if argv[0] not in names:
        print(f"mmskip bench: error: unknown benchmark {argv[0]!r}; choose one of: {', '.join(names) or '(none here)'}",
              file=sys.stderr)
        return 2
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
    target = _COMMANDS[argv[0]][0]
    if target == "bench":
        return _bench(argv[1:])
    try:
        module = _script(target[len("script:"):]) if target.startswith("script:") else importlib.import_module(target)
    except FileNotFoundError as e:
        print(f"mmskip {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    result = module.main(argv[1:])
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
