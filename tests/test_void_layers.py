import pytest
import torch

import mmskip
from mmskip import registry, schedules
from mmskip.void_layers import lac_voids

from ._ops import CountingBackend
from ._reference import assert_steps_match, recompute_logits
from .conftest import tiny_lm


def test_lac_known_case():
    # norms entering layer 0 and leaving layers 0..3 for one token: changes 5, 0.5, 4, 1
    norms = torch.tensor([1.0, 6.0, 6.5, 10.5, 11.5]).view(5, 1)
    assert lac_voids(norms, 0.5).flatten().tolist() == [False, True, False, True]
    assert lac_voids(norms, 0.0).flatten().tolist() == [False, False, False, False]
    # leaving layer 0's lift out: changes 0.5, 4, 1 -> spread 0, 3.5, 3.5
    assert lac_voids(norms, 0.5, lift_layers=1).flatten().tolist() == [False, False, False, True]


def make_identity(model, i):
    layer = model.model.layers[i]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


def test_void_skipping_is_cache_consistent_and_keeps_layer_zero(padded_batch):
    ids, mask = padded_batch
    model = tiny_lm("llama", layers=8)
    make_identity(model, 4)
    cfg = mmskip.VoidLayerConfig(schedule=schedules.adaptive(0.5, "l2_change", max_skip=0.5), min_void_fraction=0.5)
    with mmskip.applied(model, cfg) as handle, torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
        skipped = handle.stats()["skipped_layers"]
    assert 4 in skipped and 0 not in skipped and len(skipped) <= 4
    P = ids.shape[1]
    ref = recompute_logits(model, registry.get_adapter(model), out.sequences, mask, P, skip_layers=skipped)
    assert_steps_match(out.logits, ref, P)


def test_analysis_reports_identity_layer_as_void(padded_batch):
    ids, mask = padded_batch
    model = tiny_lm("llama", layers=6)
    make_identity(model, 2)
    report = mmskip.analysis.void_layers(model, ids, mask, alpha=0.3, max_new_tokens=5)
    assert len(report.prompt) == len(report.response) == 6
    assert report.prompt[2] == 1.0 and report.response[2] == 1.0
    assert report.prompt[0] == 0.0 and report.response[0] == 0.0  # lift_layers=1: layer 0 is never void
    assert 2 in report.suggested_skip
    assert not hasattr(model, "_mmskip_handle") and not hasattr(model.model, "_diffusers_hook")


def test_bad_void_configs():
    with pytest.raises(ValueError, match="l2_change"):
        mmskip.VoidLayerConfig(schedule=schedules.adaptive(0.5, "cosine"))
    with pytest.raises(ValueError, match="alpha"):
        mmskip.VoidLayerConfig(schedule=schedules.adaptive(1.5, "l2_change"))
    with pytest.raises(ValueError, match="min_void_fraction"):
        mmskip.VoidLayerConfig(min_void_fraction=0.0)


@pytest.mark.parametrize("max_skip, skip_hooks", [(0.0, 0), (0.5, 7)])
def test_one_hook_per_layer_and_no_skip_hook_when_the_cap_allows_none(padded_batch, max_skip, skip_hooks):
    from mmskip.layer_skip.hooks import LayerSkipHook

    ids, mask = padded_batch
    model = tiny_lm("llama", layers=8)
    with torch.no_grad():
        base = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    cfg = mmskip.VoidLayerConfig(schedule=schedules.adaptive(0.5, "l2_change", max_skip=max_skip))
    with mmskip.applied(model, cfg) as handle:
        registries = [dict(layer._diffusers_hook.hooks) for layer in model.model.layers]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        records = list(handle.state.records)
    assert [len(hooks) for hooks in registries] == [1] * 8  # LAC's trace and the skip test share one hook
    assert sum(isinstance(h, LayerSkipHook) for hooks in registries for h in hooks.values()) == skip_hooks
    assert [r.phase for r in records] == ["prefill"] and records[0].norms.shape[0] == 9  # every layer traced
    if max_skip == 0.0:
        assert torch.equal(out, base)


def _generate(model, prompts, compiled=False):
    """Greedy static-cache continuations of each (1, T) prompt; compiled: ``model.forward`` under
    ``torch.compile`` with a counting backend, and the graphs and graph breaks it took."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    backend = CountingBackend()
    if compiled:
        model.forward = torch.compile(model.forward, backend=backend)
    try:
        with torch.no_grad():
            out = [model.generate(p, max_new_tokens=4, do_sample=False, cache_implementation="static")
                   for p in prompts]
    finally:
        if compiled:
            del model.forward
        breaks = sum(counters["graph_break"].values())
        torch._dynamo.reset()
    return out, backend.graphs, breaks


def _prompts(n=3):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 128, (1, 8), generator=g) for _ in range(n)]


def test_compiled_zero_skip_takes_the_plain_models_graphs_and_keeps_the_records():
    """Issue 31: with a cap of 0 only LAC's trace is left, and under torch.compile it adds no graph
    break and no recompile (the records leave the graph through one custom op), on a deep copy too."""
    import copy

    model, prompts = tiny_lm("llama", layers=4), _prompts()
    plain, plain_graphs, plain_breaks = _generate(model, prompts, compiled=True)
    cfg = mmskip.VoidLayerConfig(schedule=schedules.adaptive(0.5, "l2_change", max_skip=0.0))
    with mmskip.applied(model, cfg) as handle:
        eager, _, _ = _generate(model, prompts)
        eager_records = list(handle.state.records)
        handle.state.reset()
        clone = copy.deepcopy(model)  # a copy traces into its own state, not the original's
        out, graphs, breaks = _generate(clone, prompts, compiled=True)
        records = clone._mmskip_handle.state.records
        assert handle.state.records == []
    assert (graphs, breaks) == (plain_graphs, plain_breaks) == (2, 0)  # a prompt graph and a step graph
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(out, eager, plain))
    assert [r.phase for r in records] == ["prefill"] * len(prompts)
    for rec, ref in zip(records, eager_records):
        assert torch.allclose(rec.norms, ref.norms) and torch.equal(rec.valid, ref.valid)


def test_compiled_void_skipping_decides_as_eager_without_graph_breaks():
    """The prompt's skip set is read on the host inside the op: no graph break; the prompt graph does
    not guard on the skip set, each skip set compiles one step graph, and the tokens are eager's."""
    model, prompts = tiny_lm("llama", layers=4), _prompts()
    cfg = mmskip.VoidLayerConfig(schedule=schedules.adaptive(0.9, "l2_change", max_skip=0.5), min_void_fraction=0.1)
    with mmskip.applied(model, cfg) as handle:
        sets: list[list[int]] = []
        handle.state.tracer.on_complete.append(lambda rec: sets.append(sorted(handle.state.plan.skip)))
        eager, _, _ = _generate(model, prompts)
        eager_sets, sets[:] = list(sets), []
        out, graphs, breaks = _generate(model, prompts, compiled=True)
    assert sets == eager_sets and len({tuple(s) for s in sets}) > 1 and all(sets)  # two skip sets, none empty
    assert all(torch.equal(a, b) for a, b in zip(out, eager))
    assert breaks == 0 and graphs == 1 + len({tuple(s) for s in sets})
