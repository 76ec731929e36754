import pytest
import torch

import mmskip
from mmskip import schedules


def test_remove_restores_exact_logits_and_module_state(llama, padded_batch):
    ids, mask = padded_batch
    layer = llama.model.layers[3]
    before_dict = set(layer.__dict__)
    with torch.no_grad():
        ref = llama(input_ids=ids, attention_mask=mask).logits
        handle = mmskip.apply(llama, mmskip.LayerSkipConfig(schedule=schedules.unified(2.0), phase="all"))
        changed = llama(input_ids=ids, attention_mask=mask).logits
        handle.remove()
        after = llama(input_ids=ids, attention_mask=mask).logits
    assert not torch.equal(ref, changed)
    assert torch.equal(ref, after)
    assert set(layer.__dict__) == before_dict
    assert not hasattr(llama, "_mmskip_handle")


def test_applied_context_manager_removes(llama, padded_batch):
    ids, mask = padded_batch
    with torch.no_grad():
        ref = llama(input_ids=ids, attention_mask=mask).logits
        with mmskip.applied(llama, mmskip.LayerSkipConfig(schedule=schedules.explicit(skip=[2]), phase="all")) as h:
            assert not h.removed
        assert h.removed
        assert torch.equal(ref, llama(input_ids=ids, attention_mask=mask).logits)


def test_apply_twice_and_remove_twice_raise(llama):
    h = mmskip.apply(llama, mmskip.LayerSkipConfig())
    with pytest.raises(RuntimeError, match="already has 'layer_skip' applied"):
        mmskip.apply(llama, mmskip.FFNSkipConfig())
    h.remove()
    with pytest.raises(RuntimeError, match="already removed"):
        h.remove()
    mmskip.apply(llama, mmskip.FFNSkipConfig()).remove()  # applying again after removal works


def test_unsupported_model_names_class_and_families():
    with pytest.raises(mmskip.UnsupportedModelError, match=r"Linear.*LlamaForCausalLM"):
        mmskip.apply(torch.nn.Linear(2, 2), mmskip.LayerSkipConfig())


def test_failed_apply_leaves_model_untouched(llama):
    with pytest.raises(ValueError, match="skips every layer"):
        mmskip.apply(llama, mmskip.LayerSkipConfig(schedule=schedules.explicit(skip=list(range(8)))))
    assert not hasattr(llama.model, "_diffusers_hook")
    assert not hasattr(llama, "_mmskip_handle")


def test_apply_rejects_non_config(llama):
    with pytest.raises(TypeError, match="mmskip config"):
        mmskip.apply(llama, {"schedule": "unified"})


@pytest.mark.parametrize(
    "config",
    [
        mmskip.LayerSkipConfig(schedule=schedules.unified(3.0), phase="all"),
        mmskip.FFNSkipConfig(schedule=schedules.adaptive(0.9, warmup=2, max_skip=0.3), cold=(1, 1), span=1),
        mmskip.VoidLayerConfig(schedule=schedules.adaptive(0.6, "l2_change", max_skip=0.25), min_void_fraction=0.7),
    ],
)
def test_config_json_round_trip(config):
    assert mmskip.SkipConfig.from_dict(config.to_json()) == config


def test_config_json_names_its_module_and_only_mmskip_modules_are_imported():
    d = mmskip.LayerSkipConfig().to_dict()
    assert d["module"] == "mmskip.layer_skip"
    with pytest.raises(ValueError, match="unknown technique 'nope'"):
        mmskip.SkipConfig.from_dict({"technique": "nope", "module": "antigravity"})
    import sys

    assert "antigravity" not in sys.modules
