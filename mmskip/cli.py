"""``mmskip`` command line: ``mmskip analyze ...`` (the demo is ``bash run.sh demo``).

Each subcommand lives in its own module with a ``main(argv)``; this file only dispatches.
"""

from __future__ import annotations

import importlib
import sys

_COMMANDS = {
    "analyze": ("mmskip.analysis.cli", "depth-efficiency analysis of a language model on a text file"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in _COMMANDS:
        lines = [f"  {name:<10} {help_}" for name, (_, help_) in _COMMANDS.items()]
        print("usage: mmskip COMMAND [args]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(_COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
