"""Python's own standard library source as a text corpus, with held-out modules.

Files are every ``*.py`` under ``sysconfig.get_paths()['stdlib']`` except ``site-packages``,
test suites and ``__pycache__``. A file is held out when the CRC32 of its path relative to the
stdlib root is divisible by ``HOLDOUT_MOD`` (about 5 % of files, stable across machines with the
same Python version).
"""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

__all__ = ["stdlib_files", "read_texts"]

HOLDOUT_MOD = 20
_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__", "dist-packages", "lib2to3"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(split: str = "train") -> list[Path]:
    """Sorted ``.py`` files of the stdlib in ``split`` (``"train"``, ``"test"`` or ``"all"``)."""
    root = stdlib_root()
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if any(part in _SKIP_DIRS for part in rel.parts[:-1]) or rel.parts[0].startswith("test"):
            continue
        held = zlib.crc32(str(rel.as_posix()).encode()) % HOLDOUT_MOD == 0
        if split == "all" or (split == "test") == held:
            out.append(p)
    return out


def read_texts(split: str = "train") -> list[str]:
    """The source text of each file in ``split`` (undecodable files are skipped)."""
    texts = []
    for p in stdlib_files(split):
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return texts
