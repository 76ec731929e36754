import pytest
import torch

import mmskip
from mmskip import registry, schedules

from ._reference import assert_steps_match, recompute_logits
from .conftest import tiny_lm

NEW = 8


def generate(model, ids, mask):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                              return_dict_in_generate=True, output_logits=True)


def always(max_skip=0.3, warmup=1, span=2):
    # threshold -1: every computed hot FFN counts as saturated, so the budget is the only limit
    return mmskip.FFNSkipConfig(schedule=schedules.adaptive(-1.0, "cosine", warmup=warmup, max_skip=max_skip), span=span)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_generation_equals_recompute_with_same_decisions(family, padded_batch):
    ids, mask = padded_batch
    model = tiny_lm(family, layers=10)
    cfg = mmskip.FFNSkipConfig(schedule=schedules.adaptive(0.0, "cosine", warmup=1, max_skip=0.3), cold=(1, 1), span=1)
    with mmskip.applied(model, cfg) as handle:
        out = generate(model, ids, mask)
        log = list(handle.state.log)
    assert log, "the test needs some skipped FFNs"
    P = ids.shape[1]
    mlp_skips = [(P + step - 1, layer, rows) for step, layer, rows in log]
    ref = recompute_logits(model, registry.get_adapter(model), out.sequences, mask, P, mlp_skips=mlp_skips)
    assert_steps_match(out.logits, ref, P)


def test_budget_cold_layers_and_warmup(padded_batch):
    ids, mask = padded_batch
    model = tiny_lm("llama", layers=20)
    cfg = always(max_skip=0.25, warmup=2)
    hot = cfg.hot_layers(20)
    assert (hot.start, hot.stop) == (3, 18)
    with mmskip.applied(model, cfg) as handle:
        generate(model, ids, mask)
        log = handle.state.log
        stats = handle.stats()
    per_token = {}
    for step, layer, rows in log:
        assert step > 2, "warm-up tokens run every FFN"
        assert layer in hot, "cold layers never skip"
        for r in rows.nonzero().flatten().tolist():
            per_token[(step, r)] = per_token.get((step, r), 0) + 1
    assert max(per_token.values()) == 5  # int(0.25 * 20)
    assert len(per_token) == 3 * (NEW - 1 - 2)
    skipped_tokens = sum(v["skipped"] for k, v in stats["items"].items() if k.startswith("mlp."))
    assert skipped_tokens == 5 * 3 * (NEW - 3)
    assert stats["flops_fraction"] < 1.0


def test_threshold_above_one_never_skips_and_matches_baseline(llama, padded_batch):
    ids, mask = padded_batch
    base = generate(llama, ids, mask)
    cfg = mmskip.FFNSkipConfig(schedule=schedules.adaptive(1.01, "cosine", warmup=0, max_skip=0.5))
    with mmskip.applied(llama, cfg) as handle:
        out = generate(llama, ids, mask)
        assert handle.state.log == []
    assert torch.equal(base.sequences, out.sequences)


@pytest.mark.parametrize("threshold, max_skip", [(1.01, 0.5), (0.9, 0.0)])
def test_config_that_cannot_skip_hooks_no_ffn(llama, padded_batch, threshold, max_skip):
    from ._ops import op_counts

    ids, mask = padded_batch
    base, base_ops = op_counts(lambda: generate(llama, ids, mask))
    cfg = mmskip.FFNSkipConfig(schedule=schedules.adaptive(threshold, "cosine", warmup=0, max_skip=max_skip))
    with mmskip.applied(llama, cfg) as handle:
        hooked = [name for name, m in llama.named_modules() if hasattr(m, "_diffusers_hook")]
        out, ops = op_counts(lambda: generate(llama, ids, mask))
        stats = handle.stats()
    assert not any("layers." in name for name in hooked), hooked
    assert torch.equal(base.sequences, out.sequences)
    assert ops == base_ops  # the plain model's ops, not one more
    assert stats["skipped"] == 0 and stats["executed"] > 0 and stats["flops_fraction"] == 1.0


def test_skipped_ffn_does_not_run():
    model = tiny_lm("llama", layers=10)
    calls = [0] * 10
    for i, layer in enumerate(model.model.layers):
        layer.mlp.down_proj.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    with mmskip.applied(model, always(max_skip=0.5, warmup=0, span=1)) as handle:
        generate(model, torch.randint(3, 128, (1, 5)), torch.ones(1, 5, dtype=torch.long))
        log = handle.state.log
    skipped_per_layer = [sum(1 for _, layer, _ in log if layer == i) for i in range(10)]
    assert sum(skipped_per_layer) > 0
    assert [c + s for c, s in zip(calls, skipped_per_layer)] == [NEW] * 10


def test_bad_ffn_configs():
    with pytest.raises(ValueError, match="signal='cosine'"):
        mmskip.FFNSkipConfig(schedule=schedules.adaptive(0.5, "router"))
    with pytest.raises(ValueError, match="span"):
        mmskip.FFNSkipConfig(span=0)
    with pytest.raises(ValueError, match="no hot layer"):
        mmskip.apply(tiny_lm(layers=4), mmskip.FFNSkipConfig(cold=(2, 2)))
