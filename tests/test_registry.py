import pytest

from mmskip import registry

from .conftest import tiny_lm


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_adapters_find_layers_and_sublayers(family):
    model = tiny_lm(family, layers=4)
    a = registry.get_adapter(model, "decoder")
    assert a.num_layers == 4
    for i in range(4):
        assert a.attention(i) is not None and a.mlp(i) is not None and a.mlp_norm(i) is not None
    # per token: 2 FLOPs per weight of every matmul (tiny_lm: d=64, 4 heads, 2 KV heads, d_ff=128)
    attn = {"llama": 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64), "qwen3": 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64),
            "gpt2": 2 * (64 * 192 + 64 * 64)}[family]
    mlp = {"llama": 2 * 3 * 64 * 128, "qwen3": 2 * 3 * 64 * 128, "gpt2": 2 * 2 * 64 * 256}[family]
    assert (a.attn_flops(), a.mlp_flops(), a.layer_flops()) == (attn, mlp, attn + mlp)
    assert a.head_flops() == 2 * 64 * 128


def test_unknown_model_lists_supported():
    import torch

    with pytest.raises(registry.UnsupportedModelError) as err:
        registry.get_adapter(torch.nn.GRU(2, 2), "decoder")
    msg = str(err.value)
    assert "GRU" in msg and "Qwen3ForCausalLM" in msg and "GPT2LMHeadModel" in msg


def test_register_new_family(monkeypatch):
    class MyLM(torch_module()):
        pass

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # leave no global entry behind
    registry.register("MyLM", kind="test-kind")(lambda m: ("adapter", m))
    model = MyLM()
    assert registry.get_adapter(model, "test-kind") == ("adapter", model)
    assert "MyLM" in registry.supported("test-kind")


def torch_module():
    import torch

    return torch.nn.Module
