"""Fixtures for the benchmark smoke tests: load a script as a module, keep torch's thread count."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def load_bench(monkeypatch):
    """``load_bench(name)``: ``benchmarks/<name>.py`` as module ``name`` (registered, so its dataclasses
    and sibling imports resolve; removed again after the test). ``benchmarks/`` is on ``sys.path``
    meanwhile, as it is for ``mmskip bench``, so scripts import their siblings (``harness``)."""

    monkeypatch.syspath_prepend(str(BENCH))

    def load(name: str, module_name: str | None = None):
        module_name = module_name or name
        spec = importlib.util.spec_from_file_location(module_name, BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, module_name, mod)
        spec.loader.exec_module(mod)
        return mod

    return load


@pytest.fixture
def threads():
    """The current ``torch.get_num_threads()``, restored after the test (the scripts set their own)."""
    n = torch.get_num_threads()
    yield n
    torch.set_num_threads(n)
