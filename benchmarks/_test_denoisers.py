"""The test suite's tiny random denoisers (``tests/diffusion/_tiny.py``), for the benchmarks' smoke modes.

Test fixtures live under ``tests/``, which is not installed; the benchmarks run from a clone, so
this module loads the fixture file by its path.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["tiny_pipeline_components", "tiny_unet"]

_FILE = Path(__file__).resolve().parents[1] / "tests" / "diffusion" / "_tiny.py"
_NAME = "mmskip_tests_diffusion_tiny"


def _load() -> ModuleType:
    if _NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(_NAME, _FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[_NAME] = module
        spec.loader.exec_module(module)
    return sys.modules[_NAME]


tiny_pipeline_components = _load().tiny_pipeline_components
tiny_unet = _load().tiny_unet
