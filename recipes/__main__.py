"""``python -m recipes NAME ...`` in a clone's root: the same as ``mmskip zoo NAME ...``."""

from __future__ import annotations

import sys

from mmskip.cli import run

from .zoo import main

sys.exit(run("zoo", main))
