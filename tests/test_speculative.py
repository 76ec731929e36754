import pytest
import torch

import mmskip
from mmskip.speculative import SelfSpeculativeConfig, greedy_accept, speculative_accept

from .conftest import tiny_lm

NEW = 24


def prompts(n, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (1, length + i % 5), generator=g) for i in range(n)]


def plain(model, ids, **kw):
    kw.setdefault("do_sample", False)
    with torch.no_grad():
        return model.generate(input_ids=ids, max_new_tokens=NEW, **kw)


# Aggressive drafting (no confidence stop, long drafts) so verification does real work on random weights.
EAGER = dict(confidence=0.0, max_draft=5, search_trials=10, random_trials=4)


def test_greedy_equals_plain_generate_on_24_prompts():
    model = tiny_lm("llama", layers=8)
    ps = prompts(24)
    ref = [plain(model, p) for p in ps]
    with mmskip.applied(model, SelfSpeculativeConfig(**EAGER)) as handle:
        out = [plain(model, p) for p in ps]
        stats = handle.stats()
    for a, b in zip(ref, out):
        assert torch.equal(a, b)
    assert stats["drafted_tokens"] > 0 and 0 < stats["accepted_tokens"] < stats["drafted_tokens"]
    assert stats["generated_tokens"] == 24 * NEW
    assert stats["calls"] == 24
    skipped = len(stats["layer_set"]["attn_skip"]) + len(stats["layer_set"]["mlp_skip"])
    assert skipped == round(0.45 * 16)
    assert 0 not in stats["layer_set"]["attn_skip"] + stats["layer_set"]["mlp_skip"]
    assert 7 not in stats["layer_set"]["attn_skip"] + stats["layer_set"]["mlp_skip"]


@pytest.mark.parametrize("family", ["qwen3", "gpt2"])
def test_greedy_equality_other_families(family):
    model = tiny_lm(family, layers=6)
    ps = prompts(4, seed=3)
    ref = [plain(model, p) for p in ps]
    with mmskip.applied(model, SelfSpeculativeConfig(**EAGER)):
        out = [plain(model, p) for p in ps]
    for a, b in zip(ref, out):
        assert torch.equal(a, b)


def test_left_padded_prompt_and_eos_and_max_length():
    model = tiny_lm("llama", layers=6)
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    ids[mask == 0] = 0
    ref = plain(model, ids, attention_mask=mask)
    eos = int(ref[0, 12 + 7])  # a token plain generate emits: both must stop there
    ref_eos = plain(model, ids, attention_mask=mask, eos_token_id=eos)
    ref_len = model.generate(input_ids=ids, attention_mask=mask, max_length=20, do_sample=False)
    cfg = SelfSpeculativeConfig(attn_skip=(2,), mlp_skip=(1, 3, 4), confidence=0.0, max_draft=4)
    with mmskip.applied(model, cfg):
        assert torch.equal(plain(model, ids, attention_mask=mask), ref)
        assert torch.equal(plain(model, ids, attention_mask=mask, eos_token_id=eos), ref_eos)
        out_len = model.generate(input_ids=ids, attention_mask=mask, max_length=20, do_sample=False)
        assert torch.equal(out_len, ref_len)
    assert ref_eos.shape[1] < ref.shape[1] and int(ref_eos[0, -1]) == eos


def test_cache_holds_full_model_kv_for_accepted_tokens():
    model = tiny_lm("llama", layers=8)
    ids = prompts(1, seed=7)[0]
    cfg = SelfSpeculativeConfig(attn_skip=(2, 3, 5), mlp_skip=(1, 4, 6), confidence=0.0, max_draft=4)
    with mmskip.applied(model, cfg) as handle:
        out = model.generate(input_ids=ids, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
        assert handle.stats()["drafted_tokens"] > 0
    seq, cache = out.sequences, out.cache
    with torch.no_grad():
        full = model(input_ids=seq[:, :-1], use_cache=True).cache
    assert all(layer.keys.shape[2] == seq.shape[1] - 1 for layer in cache.layers)
    for mine, ref in zip(cache.layers, full.layers):
        torch.testing.assert_close(mine.keys, ref.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mine.values, ref.values, atol=1e-5, rtol=1e-4)


def test_accepted_tokens_are_not_recomputed():
    model = tiny_lm("llama", layers=6)
    seen = []
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["hidden_states"].shape[1]), with_kwargs=True)
    with mmskip.applied(model, SelfSpeculativeConfig(attn_skip=(2,), mlp_skip=(3,), confidence=0.0, max_draft=3)) as h:
        plain(model, prompts(1)[0])
        stats = h.stats()
    # prefill (10 tokens) + one row per draft forward + (1 + drafts) rows per verify: every row
    # beyond the prompt and the generated tokens is a draft token or its verification, never a recompute
    rows = sum(seen) - 10
    assert rows == stats["drafted_tokens"] + (stats["verify_forwards"] + stats["drafted_tokens"])


def test_sampling_with_top_k_1_is_greedy_and_sampling_runs():
    model = tiny_lm("llama", layers=6)
    ids = prompts(1, seed=2)[0]
    ref = plain(model, ids)
    with mmskip.applied(model, SelfSpeculativeConfig(**EAGER)) as handle:
        assert torch.equal(plain(model, ids, do_sample=True, top_k=1), ref)
        torch.manual_seed(0)
        out = model.generate(input_ids=ids, max_new_tokens=NEW, do_sample=True, temperature=0.8, top_p=0.9)
        assert handle.stats()["drafted_tokens"] > 0
    assert out.shape == (1, ids.shape[1] + NEW) and torch.equal(out[:, : ids.shape[1]], ids)


def test_speculative_accept_keeps_target_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.2, 0.6, 0.1]])
    n = 20000
    counts = torch.zeros(4)
    for _ in range(n):
        d = torch.multinomial(q[0], 1, generator=g)
        m, nxt = speculative_accept(p, q, d, generator=g)
        counts[int(d) if m == 1 else nxt] += 1
    freq = counts / n
    assert torch.allclose(freq, p[0], atol=0.015), freq
    # a draft the target gives probability 0 is always rejected; one with p >= q always accepted
    assert speculative_accept(torch.tensor([[0.0, 1.0], [0.5, 0.5]]), torch.tensor([[1.0, 0.0]]), torch.tensor([0]))[0] == 0
    assert speculative_accept(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([1])) == (1, 0)


def test_greedy_accept():
    logits = torch.tensor([[0.0, 5.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert greedy_accept(logits, torch.tensor([1, 0])) == (2, 2)
    assert greedy_accept(logits, torch.tensor([1, 2])) == (1, 0)
    assert greedy_accept(logits, torch.tensor([2, 0])) == (0, 1)
    assert greedy_accept(logits[:1], torch.tensor([], dtype=torch.long)) == (0, 1)


def test_layer_set_is_reused_across_calls_and_confidence_stops_drafts():
    model = tiny_lm("llama", layers=8)
    ps = prompts(3)
    with mmskip.applied(model, SelfSpeculativeConfig(**EAGER)) as handle:
        plain(model, ps[0])
        first = handle.stats()
        plain(model, ps[1])
        second = handle.stats()
    assert first["search_evals"] > 0 and second["search_evals"] == first["search_evals"]
    assert second["layer_set"] == first["layer_set"]
    with mmskip.applied(model, SelfSpeculativeConfig(**EAGER, reoptimize_below=1.0)) as handle:
        plain(model, ps[1])
        assert handle.stats()["acceptance_rate"] < 1.0  # so the next call searches again
        plain(model, ps[2])
        assert handle.stats()["search_evals"] == 2 * first["search_evals"]
    ref = plain(model, ps[2])
    with mmskip.applied(model, SelfSpeculativeConfig(confidence=1.0, search_trials=2, random_trials=2)) as handle:
        assert torch.equal(plain(model, ps[2]), ref)
        stats = handle.stats()
        # one (unconfident) draft per round, none in a last round with room for one token only
        assert stats["verify_forwards"] - 1 <= stats["drafted_tokens"] <= stats["verify_forwards"]


def test_remove_restores_generate_and_outputs():
    model = tiny_lm("llama", layers=6)
    ids = prompts(1)[0]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    handle = mmskip.apply(model, SelfSpeculativeConfig(**EAGER))
    assert "generate" in model.__dict__
    plain(model, ids)
    handle.remove()
    assert "generate" not in model.__dict__ and "forward" not in model.__dict__
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_bad_input():
    model = tiny_lm("llama", layers=6)
    with mmskip.applied(model, SelfSpeculativeConfig(**EAGER)):
        with pytest.raises(ValueError, match="batch size 1"):
            model.generate(input_ids=torch.ones(2, 4, dtype=torch.long), max_new_tokens=3)
        with pytest.raises(ValueError, match="num_beams"):
            model.generate(input_ids=torch.ones(1, 4, dtype=torch.long), max_new_tokens=3, num_beams=2)
        with pytest.raises(ValueError, match="does not support"):
            model.generate(input_ids=torch.ones(1, 4, dtype=torch.long), max_new_tokens=3, output_scores=True)
    with pytest.raises(ValueError, match="skip_ratio"):
        SelfSpeculativeConfig(skip_ratio=1.0)
    with pytest.raises(ValueError, match="confidence"):
        SelfSpeculativeConfig(confidence=1.5)
    with pytest.raises(ValueError, match="layer 0's attention"):
        mmskip.apply(model, SelfSpeculativeConfig(attn_skip=(0,)))
    with pytest.raises(ValueError, match="6 layers"):
        mmskip.apply(model, SelfSpeculativeConfig(mlp_skip=(9,)))
    cfg = SelfSpeculativeConfig(attn_skip=[2], mlp_skip=(3, 4))
    assert mmskip.SkipConfig.from_dict(cfg.to_json()) == cfg


def test_zoo_lm_greedy_equality_on_20_held_out_prompts():
    from mmskip import zoo

    try:
        zoo.path("stdlib-lm")
    except FileNotFoundError:
        pytest.skip("the zoo's stdlib-lm is not trained here (python -m mmskip.zoo.train stdlib-lm)")
    from mmskip.zoo.stdlib_data import read_texts

    model, tok = zoo.load("stdlib-lm")
    model = model.float()
    ps = []
    for text in read_texts("test"):
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if ids.shape[1] >= 96:
            ps.append(ids[:, ids.shape[1] // 3 : ids.shape[1] // 3 + 32])
        if len(ps) == 20:
            break
    ref = [plain(model, p) for p in ps]
    with mmskip.applied(model, SelfSpeculativeConfig(search_trials=12, random_trials=6)) as handle:
        out = [plain(model, p) for p in ps]
        stats = handle.stats()
    assert len(ps) == 20 and stats["accepted_tokens"] > 0
    for a, b in zip(ref, out):
        assert torch.equal(a, b)


def test_sampling_warpers_match_transformers_defaults():
    """With the model's default generation config (top_k=50 from transformers' global defaults),
    the sampling distribution equals the one transformers' generate samples from."""
    from mmskip.speculative import _probs

    model = tiny_lm("llama", layers=4)
    ids = prompts(1)[0]
    for kw in ({}, {"temperature": 0.7, "top_p": 0.8}, {"top_k": 5}):
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=1, do_sample=True, return_dict_in_generate=True,
                                 output_scores=True, output_logits=True, **kw)
        warped = out.scores[0].float().softmax(-1)
        handle = mmskip.apply(model, SelfSpeculativeConfig(**EAGER))
        gen = handle.state._generation_config(model, {"do_sample": True, **kw})
        handle.remove()
        torch.testing.assert_close(_probs(out.logits[0], gen), warped, atol=1e-6, rtol=1e-5)
        assert gen.top_k == kw.get("top_k", 50)
