"""``mmskip`` command line: ``mmskip analyze ...`` (the demo is ``bash run.sh demo``).

Each subcommand lives in its own module with a ``main(argv)``; this file only dispatches.
"""

from __future__ import annotations

import importlib
import sys

_COMMANDS = {
    "analyze": ("mmskip.analysis.cli", "depth-efficiency analysis of a language model on a text file"),
}


def usage() -> str:
    lines = [f"  {name:<10} {help_}" for name, (_, help_) in _COMMANDS.items()]
    return "usage: mmskip COMMAND [args]\n\ncommands:\n" + "\n".join(lines)


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
    module = importlib.import_module(_COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
