"""Every technique under ``torch.compile`` (GitHub issue 31): a matrix of what works today.

For each technique on its tiny model (CPU, float32), ``model.forward`` is compiled with a counting
dynamo backend that runs the captured graphs eagerly, and greedy ``generate`` is checked against
the same technique run eagerly:

- ``outputs``: the compiled call gives the eager tokens;
- ``no_recompile``: a second call and a call with another prompt of the same shape compile
  nothing new (``torch.compiler.set_stance("fail_on_recompile")``, and the backend captures no
  new graph) and give the eager tokens;
- ``stats``: ``handle.stats()`` after the compiled call equals it after the eager call (wall-clock
  fields aside);
- ``fullgraph``: the same with ``fullgraph=True`` (the first call's tokens).

Each technique runs once per mode (a module-level cache) and the four checks read the result, so
the matrix costs one eager and one compiled run per technique. Failures are ``xfail(strict=True)``
with the failure seen: the matrix documents the truth and turns red when a technique is fixed.
The plain models are rows too, to tell a technique's failure from the model's. A static cache
where the technique takes one (SWIFT and p-MoD / VideoLLM-MoD take the dynamic cache only). Rows
marked ``slow`` compile many graphs (graph breaks, recompiles) or a bigger model: ``-m "not slow"``
runs the rest in under a minute on one CPU core.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import mmskip
from mmskip import schedules

from ._ops import CountingBackend
from .conftest import tiny_lm
from .test_routers import fixed_routers
from .vision._mue_common import EXITS
from .vision._tiny import onevision_video_prompts, padded_prompts, tiny_llava, tiny_onevision
from .vision._tiny_florence import florence_prompts, tiny_florence
from .vision._tiny_t5gemma2 import EXITS as T5G_EXITS
from .vision._tiny_t5gemma2 import t5gemma2_prompts, tiny_t5gemma2

NEW = 4


def _lm() -> torch.nn.Module:
    return tiny_lm("llama", layers=4)


def _lm_prompts() -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(3)
    return ({"input_ids": torch.randint(3, 128, (1, 8), generator=g)},
            {"input_ids": torch.randint(3, 128, (1, 8), generator=g)})


@dataclass
class Case:
    model: Callable[[], torch.nn.Module]
    config: Callable[[Any], mmskip.SkipConfig | None]  # given pytest's tmp_path_factory; None: the plain model
    prompts: Callable[[], tuple[dict, dict]]
    static: bool = True  # cache_implementation="static" (where the technique takes one)
    xfail: dict[str, str] = field(default_factory=dict)  # check -> the failure seen
    slow: bool = False  # > ~10 s here: many graphs (graph breaks, recompiles) or a bigger model


def _routers(tmp: Any) -> mmskip.RouterConfig:
    return mmskip.RouterConfig(path=fixed_routers(_lm(), {1, 2}, tmp.mktemp("routers")))


def _vision(name: str) -> Any:
    from mmskip.vision import MoDConfig, VideoMoDConfig
    return {"pmod": MoDConfig, "videomod": VideoMoDConfig}[name]()


_REPLAY = ("fullgraph: Unsupported: threading.get_ident in vision/generation_replay.py:48 (the thread's generation), "
           "then in the CallGuard InputHook holds (mmskip/_guard.py enter), then InputHook's data-dependent "
           "bool(routed.any()): p-MoD's prefill / decode / replay decisions are host-side Python by design")

_MUE_EAGER = ("fullgraph: Unsupported: skip calling the torch.compiler.disable'd run_eagerly (vision/mue/decoder.py): "
              "MuE's measured encoder pass and decoder forward run eagerly, one graph break each, because whether a "
              "layer runs is the exit decision (a host read, then Python control flow)")

CASES: dict[str, Case] = {
    "plain-llama": Case(_lm, lambda t: None, _lm_prompts),
    "layer_skip-decode": Case(
        _lm, lambda t: mmskip.LayerSkipConfig(schedule=schedules.explicit(skip=[1, 2]), phase="decode"), _lm_prompts),
    "layer_skip-all": Case(
        _lm, lambda t: mmskip.LayerSkipConfig(schedule=schedules.explicit(skip=[1, 2]), phase="all"), _lm_prompts),
    "ffn_skip": Case(
        _lm, lambda t: mmskip.FFNSkipConfig(schedule=schedules.adaptive(0.5, "cosine", warmup=2, max_skip=0.5),
                                            cold=(1, 0), span=1), _lm_prompts),
    "void_layers": Case(
        _lm, lambda t: mmskip.VoidLayerConfig(schedule=schedules.adaptive(0.9, "l2_change", max_skip=0.5),
                                              min_void_fraction=0.1), _lm_prompts,
        xfail={"no_recompile": "the skip set is decided per prompt ({2} for one prompt, {3} for the other) and is "
                               "Python control flow in the decode graph: each set compiles its own step graph (the "
                               "prompt graph, free of graph breaks, is shared). A device-side branch (torch.cond per "
                               "layer) is refused by dynamo around transformers' layers: HOP: Unsafe side effect (a "
                               "mutated CompileableContextVar, transformers' output collector, around a whole layer; "
                               "the kernels hub's _ACTIVE_KERNEL_FUNCS ContextVar reset around the MLP; reproduced "
                               "without mmskip); first failing guard: the skip set, read in SkipPlan.skips"}),
    "swift": Case(
        _lm, lambda t: mmskip.SelfSpeculativeConfig(attn_skip=(2,), mlp_skip=(1, 2), confidence=0.0, max_draft=4),
        _lm_prompts, static=False, slow=True),  # SWIFT takes the dynamic cache only
    "first_routers": Case(
        _lm, _routers, _lm_prompts,
        xfail={"fullgraph": "fullgraph: Unsupported: skip inlining the torch.compiler.disable'd prefill decision "
                            "(_RouterHook._decide): the routers pick during prefill, layer by layer, which layers "
                            "run, a data-dependent branch; torch.cond around a transformers layer, the one graph-"
                            "friendly branch, is refused by dynamo (HOP: Unsafe side effect, see void_layers)"}),
    "plain-llava": Case(tiny_llava, lambda t: None, lambda: (padded_prompts(), padded_prompts(seed=7)), static=False,
                        slow=True),
    "pmod": Case(
        tiny_llava, lambda t: _vision("pmod"), lambda: (padded_prompts(), padded_prompts(seed=7)),
        static=False, slow=True,  # p-MoD keeps a per-layer number of tokens: DynamicCache only
        xfail={"fullgraph": _REPLAY}),
    "plain-onevision": Case(tiny_onevision, lambda t: None,
                            lambda: (onevision_video_prompts(), onevision_video_prompts(seed=9)), static=False,
                            slow=True),
    "videomod": Case(
        tiny_onevision, lambda t: _vision("videomod"),
        lambda: (onevision_video_prompts(), onevision_video_prompts(seed=9)), static=False, slow=True,
        xfail={"fullgraph": _REPLAY}),
    "plain-florence": Case(tiny_florence, lambda t: None, lambda: (florence_prompts(), florence_prompts(seed=5))),
    "mue": Case(
        tiny_florence, lambda t: copy.deepcopy(EXITS), lambda: (florence_prompts(), florence_prompts(seed=5)),
        xfail={"fullgraph": _MUE_EAGER}),
    "mue-t5gemma2": Case(
        tiny_t5gemma2, lambda t: copy.deepcopy(T5G_EXITS), lambda: (t5gemma2_prompts(), t5gemma2_prompts(seed=5)),
        slow=True, xfail={"fullgraph": _MUE_EAGER}),
}


@dataclass
class Run:
    eager: list[torch.Tensor]
    eager_stats: dict | None
    compiled: torch.Tensor | None = None
    compiled_stats: dict | None = None
    again: list[torch.Tensor] | None = None
    error: BaseException | None = None  # what the compiled first call raised
    recompile: BaseException | None = None  # what the fail_on_recompile calls raised
    graphs: int = 0  # graphs the first compiled call captured
    graphs_again: int | None = None  # graphs the second and the other-prompt calls added


def _generate(model: torch.nn.Module, batch: dict, static: bool) -> torch.Tensor:
    kw = {"cache_implementation": "static"} if static else {}
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=NEW, do_sample=False, **kw)


def _applied(model: torch.nn.Module, config: mmskip.SkipConfig | None) -> Any:
    """``mmskip.applied(model, config)``, or nothing for the plain model (``config`` None)."""
    return mmskip.applied(model, config) if config is not None else contextlib.nullcontext()


def _stats(handle: Any) -> dict | None:
    if handle is None:
        return None
    return {k: v for k, v in handle.stats().items() if not k.endswith("_seconds")}  # wall clock differs


def _eager(case: Case, tmp: Any) -> tuple[torch.nn.Module, Run]:
    model = case.model()
    first, other = case.prompts()
    with _applied(model, case.config(tmp)) as handle:
        eager = [_generate(model, first, case.static)]
        stats = _stats(handle)
        eager.append(_generate(model, other, case.static))
    return model, Run(eager, stats)


def _run(case: Case, tmp: Any, fullgraph: bool, model: torch.nn.Module, eager: Run) -> Run:
    torch._dynamo.reset()
    first, other = case.prompts()
    run = Run(eager.eager, eager.eager_stats)
    backend = CountingBackend()
    with _applied(model, case.config(tmp)) as handle:
        model.forward = torch.compile(model.forward, backend=backend, fullgraph=fullgraph)
        try:
            run.compiled = _generate(model, first, case.static)
            run.compiled_stats = _stats(handle)
            run.graphs = backend.graphs
            if not fullgraph:
                with torch.compiler.set_stance("fail_on_recompile"):  # a new frame would still compile:
                    run.again = [_generate(model, first, case.static), _generate(model, other, case.static)]
                run.graphs_again = backend.graphs - run.graphs  # so the graphs are counted too
        except Exception as err:  # dynamo's Unsupported / data-dependent guards; a recompile under the stance
            if run.compiled is None:
                run.error = err
            else:
                run.recompile = err
        finally:
            del model.forward
    torch._dynamo.reset()
    return run


_RUNS: dict[tuple[str, bool], Run] = {}
_EAGER: dict[str, tuple[torch.nn.Module, Run]] = {}


@pytest.fixture
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, bool], Run]:
    def get(name: str, fullgraph: bool = False) -> Run:
        key = (name, fullgraph)
        if key not in _RUNS:
            if name not in _EAGER:
                _EAGER[name] = _eager(CASES[name], tmp_path_factory)
            _RUNS[key] = _run(CASES[name], tmp_path_factory, fullgraph, *_EAGER[name])
        return _RUNS[key]
    return get


def _params(check: str) -> list:
    params = []
    for name, case in CASES.items():
        marks = [pytest.mark.slow] if case.slow else []
        if check in case.xfail:
            marks.append(pytest.mark.xfail(strict=True, reason=case.xfail[check]))
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def _first_line(err: BaseException | None) -> str:
    """The error's first line, and for a recompile the first guard that failed."""
    if err is None:
        return ""
    lines = str(err).strip().splitlines()
    guard = next((line.strip() for line in lines if line.strip().startswith("- ")), "")
    ours = [line.strip() for line in lines if "/mmskip/" in line or "/vision/" in line]  # the technique's frame
    return f"{type(err).__name__}: {lines[0]} {guard} {ours[-1] if ours else ''}"


@pytest.mark.parametrize("name", _params("outputs"))
def test_outputs(run, name):
    r = run(name)
    assert r.error is None, _first_line(r.error)
    assert torch.equal(r.compiled, r.eager[0])


@pytest.mark.parametrize("name", _params("no_recompile"))
def test_no_recompile(run, name):
    r = run(name)
    assert r.error is None and r.recompile is None, _first_line(r.error or r.recompile)
    assert r.graphs_again == 0
    assert torch.equal(r.again[0], r.eager[0]) and torch.equal(r.again[1], r.eager[1])


@pytest.mark.parametrize("name", [p for p in _params("stats") if not p.id.startswith("plain")])
def test_stats(run, name):
    r = run(name)
    assert r.error is None, _first_line(r.error)
    assert r.compiled_stats == r.eager_stats


@pytest.mark.parametrize("name", _params("fullgraph"))
def test_fullgraph(run, name):
    r = run(name, fullgraph=True)
    assert r.error is None, _first_line(r.error)
    assert torch.equal(r.compiled, r.eager[0])
