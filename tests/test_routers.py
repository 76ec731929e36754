import pytest
import torch

import mmskip
from mmskip import registry
from mmskip.first_routers import RouterConfig, Routers
from mmskip.train.first import evaluate_routers, soft_gates, train_routers

from ._reference import assert_steps_match, recompute_logits
from .conftest import tiny_lm

NEW = 6


def fixed_routers(model, skip, tmp_path, name="r"):
    """Routers whose decision ignores the input: keep probability 0.1 for ``skip``, 0.9 otherwise."""
    routers = Routers.for_model(model, width=8)
    with torch.no_grad():
        for i in routers.routed:
            routers[i].fc2.weight.zero_()
            routers[i].fc2.bias.fill_(torch.logit(torch.tensor(0.1 if i in skip else 0.9)).item())
    return str(routers.save(tmp_path / name))


def generate(model, ids, mask):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                              return_dict_in_generate=True, output_logits=True)


def test_decisions_fixed_for_the_whole_generation_and_cache_consistent(padded_batch, tmp_path):
    ids, mask = padded_batch
    model = tiny_lm("llama", layers=8)
    path = fixed_routers(model, {2, 5, 6}, tmp_path)
    calls = [0] * 8
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    with mmskip.applied(model, RouterConfig(path=path)) as handle:
        out = generate(model, ids, mask)
        stats = handle.stats()
        log = handle.state.decisions.log
    assert stats["skipped_layers"] == [2, 5, 6] and log == [[2, 5, 6]]  # decided once, at prefill
    assert calls == [0 if i in (2, 5, 6) else NEW for i in range(8)]  # skipped in prefill and every decode step
    ref = recompute_logits(model, registry.get_adapter(model), out.sequences, mask, 0, skip_layers=[2, 5, 6])
    P = ids.shape[1]
    assert_steps_match(out.logits, ref, P)


def test_routers_are_input_adaptive_and_decide_again_per_prompt(tmp_path):
    model = tiny_lm("llama", layers=6)
    routers = Routers.for_model(model, width=8)
    emb = model.model.embed_tokens.weight
    with torch.no_grad():  # layer 1's router keys on the direction of token 7's embedding
        for i in routers.routed:
            routers[i].fc2.weight.zero_()
            routers[i].fc2.bias.fill_(5.0)
        r = routers[1]
        d = emb[7] / emb[7].pow(2).mean().sqrt()
        r.fc1.weight.zero_()
        r.fc1.bias.zero_()
        r.fc1.weight[0] = d / d.norm() ** 2
        r.fc2.weight[0, 0] = -40.0
        r.fc2.bias.fill_(20.0)
    path = str(routers.save(tmp_path / "r"))
    # layer 1 sees the residual after layer 0; use a model whose layer 0 is identity so it sees embeddings
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
    with mmskip.applied(model, RouterConfig(path=path)) as handle:
        for prompt in ([7] * 8, [9, 10, 11, 12, 13, 14, 15, 16], [7] * 8):
            with torch.no_grad():
                model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=3, do_sample=False)
        log = handle.state.decisions.log
    assert log == [[1], [], [1]]


def test_threshold_and_budget_knobs(tmp_path):
    model = tiny_lm("llama", layers=8)
    path = fixed_routers(model, {1, 2, 3, 4}, tmp_path)
    ids = torch.randint(3, 128, (1, 8))
    for cfg, expected in [
        (RouterConfig(path=path, threshold=0.5), [1, 2, 3, 4]),
        (RouterConfig(path=path, threshold=0.05), []),
        (RouterConfig(path=path, threshold=0.95), list(range(1, 8))),
        (RouterConfig(path=path, threshold=0.5, max_skip=0.25), [1, 2]),
    ]:
        with mmskip.applied(model, cfg) as handle, torch.no_grad():
            model(input_ids=ids)
            assert handle.stats()["skipped_layers"] == expected


def test_save_load_round_trip_and_bad_input(tmp_path):
    model = tiny_lm("llama", layers=6)
    routers = Routers.for_model(model, width=8)
    path = routers.save(tmp_path / "r", note="x")
    loaded = Routers.load(path)
    assert loaded.meta == {"note": "x"} and loaded.routed == [1, 2, 3, 4, 5]
    for a, b in zip(routers.parameters(), loaded.parameters()):
        assert torch.equal(a, b)
    assert RouterConfig.from_dict(RouterConfig(path=str(path), threshold=0.3).to_json()).threshold == 0.3
    with pytest.raises(ValueError, match="threshold"):
        RouterConfig(threshold=2.0)
    with pytest.raises(ValueError, match="needs path"):
        mmskip.apply(model, RouterConfig())
    with pytest.raises(FileNotFoundError, match="mmskip.train.first"):
        mmskip.apply(model, RouterConfig(path=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="trained for a model with 6 layers and hidden size 64"):
        mmskip.apply(tiny_lm("llama", layers=4), RouterConfig(path=str(path)))
    other = Routers(hidden_size=32, num_layers=6, width=8).save(tmp_path / "r32")
    with pytest.raises(ValueError, match="hidden size 32"):  # not a raw matmul error at the first forward
        mmskip.apply(model, RouterConfig(path=str(other)))
    assert not hasattr(model, "_mmskip_handle")


def test_soft_gates_are_exact_at_the_extremes(tmp_path):
    model = tiny_lm("llama", layers=6)
    ids = torch.randint(3, 128, (2, 10))
    routers = Routers.for_model(model, width=8)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        for i in routers.routed:
            routers[i].fc2.weight.zero_()
            routers[i].fc2.bias.fill_(100.0 if i != 3 else -100.0)  # keep all but layer 3
        with soft_gates(model, routers) as probs:
            gated = model(input_ids=ids).logits
    assert len(probs) == 5
    ref = recompute_logits(model, registry.get_adapter(model), ids, torch.ones_like(ids), 0, skip_layers=[3])
    torch.testing.assert_close(gated, ref, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(gated, full)


def test_training_moves_only_routers_and_sparsity_lowers_keep(tmp_path):
    model = tiny_lm("llama", layers=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = torch.randint(3, 128, (16, 12), generator=torch.Generator().manual_seed(0))
    routers = Routers.for_model(model, width=8)
    _, hist = train_routers(model, routers, data, steps=30, batch=4, lr=2e-2, sparsity=5.0, log_every=29)
    assert hist[-1]["keep"] < hist[0]["keep"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    path = routers.save(tmp_path / "r")
    rows = evaluate_routers(model, path, data[:3], [0.5])
    assert rows[0]["name"] == "full model" and rows[0]["agreement"] == 1.0
    assert rows[1]["threshold"] == 0.5 and 0 <= rows[1]["skipped_layers"] <= 3 and rows[1]["perplexity"] > 0


def test_training_with_lora(tmp_path):
    pytest.importorskip("peft")
    model = tiny_lm("llama", layers=4)
    data = torch.randint(3, 128, (8, 10), generator=torch.Generator().manual_seed(0))
    routers = Routers.for_model(model, width=8)
    peft_model, hist = train_routers(model, routers, data, steps=3, batch=2, lora=True, log_every=1)
    assert len(hist) == 3
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_straight_through_gates_are_hard_in_forward():
    model = tiny_lm("llama", layers=6)
    ids = torch.randint(3, 128, (2, 10))
    routers = Routers.for_model(model, width=8)
    with torch.no_grad():
        for i in routers.routed:
            routers[i].fc2.weight.zero_()
            routers[i].fc2.bias.fill_(1.0 if i != 2 else -1.0)  # p = 0.73 (kept) / 0.27 (skipped)
    with soft_gates(model, routers, straight_through=True) as probs:
        hard = model(input_ids=ids).logits
    ref = recompute_logits(model, registry.get_adapter(model), ids, torch.ones_like(ids), 0, skip_layers=[2])
    torch.testing.assert_close(hard, ref, atol=1e-4, rtol=1e-4)
    hard.sum().backward()
    assert routers[2].fc2.bias.grad is not None and routers[2].fc2.bias.grad.abs() > 0
    assert len(probs) == 5


def test_evaluation_compares_with_a_static_schedule(tmp_path):
    model = tiny_lm("llama", layers=6)
    path = fixed_routers(model, {2, 4}, tmp_path)
    data = torch.randint(3, 128, (3, 12), generator=torch.Generator().manual_seed(0))
    rows = evaluate_routers(model, path, data, [0.5], static_order=[2, 4, 1])
    routed, static = rows[1], rows[2]
    assert routed["skipped_layers"] == 2.0 and routed["distinct_skip_sets"] == 1
    assert static["name"] == "static 2 layers"  # same layers, decided statically: same numbers
    assert static["perplexity"] == pytest.approx(routed["perplexity"]) and static["agreement"] == routed["agreement"]
