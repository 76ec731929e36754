"""MuE under ``torch.compile`` (GitHub issue 31): batch-1 greedy generation on a tiny Florence-2.

A counting dynamo backend runs the captured graphs eagerly, so tokens and stats must equal the eager
run's exactly; dynamo's recompile-limit fallback is turned into an error, so a frame that would
recompile per decoder step (and then run eagerly) fails the test instead of hiding in the timing.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from mmskip.vision.mue import MuEConfig
from torch._dynamo.utils import counters

import mmskip

from .._ops import CountingBackend
from ._mue_common import EXITS, NEVER
from ._tiny_florence import florence_prompts, row, tiny_florence

NEW = 12  # more decoder steps than dynamo's recompile limit (8): a per-step recompile cannot pass


def _prompts() -> tuple[dict, dict]:
    """Two single-row prompts of different lengths."""
    b = florence_prompts()
    return row(b, 0), row(b, 1)


def _gen(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=NEW, do_sample=False)


def _stats(handle: Any) -> dict | None:
    return None if handle is None else {k: v for k, v in handle.stats().items() if not k.endswith("_seconds")}


def _run(config: MuEConfig | None) -> dict[str, Any]:
    """Eager tokens and stats, then the compiled ones with graph, break and recompile counts."""
    model = tiny_florence()
    first, other = _prompts()
    out: dict[str, Any] = {}
    with mmskip.applied(model, config) if config is not None else contextlib.nullcontext() as h:
        out["eager"] = [_gen(model, first), _gen(model, other)]
        if h is not None:
            h.reset_stats()
            _gen(model, first)
            out["eager_stats"] = _stats(h)
            h.reset_stats()
    torch._dynamo.reset()
    counters.clear()
    backend = CountingBackend()
    with mmskip.applied(model, config) if config is not None else contextlib.nullcontext() as h:
        model.forward = torch.compile(model.forward, backend=backend)
        try:
            with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
                out["compiled"] = _gen(model, first)
                out["stats"] = _stats(h)
                out["graphs"] = backend.graphs
                out["breaks"] = sum(counters["graph_break"].values())
                out["frames"] = counters["frames"]["total"]
                out["again"] = [_gen(model, first)]
                out["same_added"] = (backend.graphs - out["graphs"], counters["frames"]["total"] - out["frames"])
                out["again"].append(_gen(model, other))
                out["graphs_again"] = backend.graphs - out["graphs"]
        finally:
            del model.forward
            torch._dynamo.reset()
    return out


_RUNS: dict[str, dict[str, Any]] = {}
_CONFIGS: dict[str, MuEConfig | None] = {"plain": None, "never": copy.deepcopy(NEVER[0]), "exits": copy.deepcopy(EXITS)}


@pytest.fixture
def runs() -> Callable[[str], dict[str, Any]]:
    def get(name: str) -> dict[str, Any]:
        if name not in _RUNS:
            _RUNS[name] = _run(_CONFIGS[name])
        return _RUNS[name]
    return get


@pytest.mark.parametrize("name", ["never", "exits"])
def test_compiled_tokens_and_stats_equal_eager(runs, name):
    r = runs(name)
    assert torch.equal(r["compiled"], r["eager"][0])
    assert torch.equal(r["again"][0], r["eager"][0]) and torch.equal(r["again"][1], r["eager"][1])
    assert r["stats"] == r["eager_stats"]


def test_never_exiting_config_compiles_as_plain(runs):
    """No exit can trigger: the decoder's bookkeeping leaves the graph through one op, so nothing
    recompiles per step (it guarded on the generation's length) and the graphs are the plain model's."""
    plain, never = runs("plain"), runs("never")
    assert never["breaks"] == plain["breaks"] == 0
    assert never["graphs"] == plain["graphs"]
    assert never["graphs_again"] == plain["graphs_again"]
    assert never["stats"]["decoder"]["tokens"] == NEW and never["stats"]["skipped"] == 0


def test_exits_compile_a_bounded_number_of_graphs(runs):
    """With exits, the encoder pass and each decoder forward run their layers eagerly (one graph break
    each, at the encoder / decoder call: the exits are decided as without compile) instead of a break
    at every exit decision deep in the layer loop: no more graphs than the plain model, nothing compiled
    again for a repeated prompt, a bounded number of frames (not one set per generated token), and no
    frame reaches dynamo's recompile limit (an error here, not a silent fallback to eager)."""
    plain, exits = runs("plain"), runs("exits")
    assert exits["stats"]["skipped"] > 0  # exits did happen
    assert 0 < exits["breaks"] < NEW  # traced frames that meet the break: the call chain, not one per token
    assert exits["graphs"] <= plain["graphs"]
    assert exits["graphs_again"] <= plain["graphs_again"]
    assert exits["same_added"] == (0, 0) == plain["same_added"]
