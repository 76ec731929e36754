import pytest
import torch

import mmskip
from mmskip import registry, schedules

from ._reference import assert_steps_match, recompute_logits
from .conftest import tiny_lm

NEW = 6


def generate(model, ids, mask, **kw):
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
            return_dict_in_generate=True, output_logits=True, **kw,
        )


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
@pytest.mark.parametrize("phase", ["decode", "all"])
def test_cached_generation_equals_full_recompute(family, phase, padded_batch):
    ids, mask = padded_batch
    model = tiny_lm(family)
    adapter = registry.get_adapter(model)
    config = mmskip.LayerSkipConfig(schedule=schedules.unified(2.0), phase=phase)
    with mmskip.applied(model, config) as handle:
        out = generate(model, ids, mask)
        skipped = handle.stats()["skipped_layers"]
    assert skipped == [1, 3, 5, 6]
    P = ids.shape[1]
    ref = recompute_logits(model, adapter, out.sequences, mask, 0 if phase == "all" else P, skip_layers=skipped)
    assert_steps_match(out.logits, ref, P)
    assert torch.equal(out.sequences[:, P:], torch.stack([lg.argmax(-1) for lg in out.logits], 1))


def test_skipped_layers_do_not_run_in_decode(llama, padded_batch):
    ids, mask = padded_batch
    calls = [0] * 8
    for i, layer in enumerate(llama.model.layers):
        layer.self_attn.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
        layer.mlp.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    with mmskip.applied(llama, mmskip.LayerSkipConfig(schedule=schedules.explicit(skip=[2, 5]))) as handle:
        generate(llama, ids, mask)
        stats = handle.stats()
    # prefill runs every layer (2 sublayer calls); decode forwards skip layers 2 and 5
    assert calls == [2 * NEW if i not in (2, 5) else 2 for i in range(8)]
    assert stats["items"]["layer.2"]["skipped"] == 3 * (NEW - 1)
    assert stats["items"]["layer.2"]["executed"] == 3 * 10
    assert stats["items"]["layer.3"]["skipped"] == 0


def test_skipped_layer_kv_is_copied_from_nearest_lower_kept_layer(llama, padded_batch):
    ids, mask = padded_batch
    with mmskip.applied(llama, mmskip.LayerSkipConfig(schedule=schedules.explicit(skip=[3, 4]))):
        cache = generate(llama, ids, mask).past_key_values
    total = ids.shape[1] + NEW - 1
    assert all(layer.keys.shape[2] == total for layer in cache.layers)
    P = ids.shape[1]
    for i in (3, 4):
        assert torch.equal(cache.layers[i].keys[:, :, P:], cache.layers[2].keys[:, :, P:])
        assert torch.equal(cache.layers[i].values[:, :, P:], cache.layers[2].values[:, :, P:])
        assert not torch.equal(cache.layers[i].keys[:, :, :P], cache.layers[2].keys[:, :, :P])


def test_zero_skip_config_is_token_equal(llama, padded_batch):
    ids, mask = padded_batch
    base = generate(llama, ids, mask)
    with mmskip.applied(llama, mmskip.LayerSkipConfig(schedule=schedules.unified(1.0))) as handle:
        out = generate(llama, ids, mask)
        assert handle.stats()["flops_fraction"] == 1.0
    assert torch.equal(base.sequences, out.sequences)
    for a, b in zip(base.logits, out.logits):
        assert torch.equal(a, b)


def test_flops_fraction_counts_head_and_kept_layers(llama):
    ids = torch.randint(3, 128, (1, 5))
    a = registry.get_adapter(llama)
    with mmskip.applied(llama, mmskip.LayerSkipConfig(schedule=schedules.explicit(skip=[1, 2, 3, 4]), phase="all")) as h:
        with torch.no_grad():
            llama(input_ids=ids)
        frac = h.stats()["flops_fraction"]
    layer, head = a.layer_flops(), a.head_flops()
    assert frac == pytest.approx((4 * layer + head) / (8 * layer + head))


def test_layer_zero_skipped_with_cache_is_refused(llama, padded_batch):
    ids, mask = padded_batch
    with mmskip.applied(llama, mmskip.LayerSkipConfig(schedule=schedules.explicit(skip=[0]), phase="all")):
        with pytest.raises(ValueError, match="no lower layer is kept"):
            generate(llama, ids, mask)
        generate(llama, ids, mask, use_cache=False)  # without a cache it is fine


def test_bad_configs():
    with pytest.raises(ValueError, match="phase must be"):
        mmskip.LayerSkipConfig(phase="prefill")
    with pytest.raises(ValueError, match="static schedule"):
        mmskip.LayerSkipConfig(schedule=schedules.adaptive(0.9))
    with pytest.raises(ValueError, match="fractional"):
        mmskip.apply(tiny_lm(layers=4), mmskip.LayerSkipConfig(schedule=schedules.progressive()))
    with pytest.raises(ValueError, match="exceeds the number of layers"):
        mmskip.apply(tiny_lm(layers=4), mmskip.LayerSkipConfig(schedule=schedules.unified(5.0)))


def test_output_hidden_states_still_work(llama):
    ids = torch.randint(3, 128, (2, 6))
    with mmskip.applied(llama, mmskip.LayerSkipConfig(schedule=schedules.explicit(skip=[4]), phase="all")):
        with torch.no_grad():
            hs = llama(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(hs) == 9
    assert torch.equal(hs[5], hs[4])
