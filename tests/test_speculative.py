
import pytest
import torch

import mmskip
from mmskip._skip_unit import SkipUnitHook
from mmskip.swift import SelfSpeculativeConfig, greedy_accept, speculative_accept, swift_decode

from .conftest import tiny_lm

NEW = 24


def prompts(n, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (1, length + i % 5), generator=g) for i in range(n)]


def plain(model, ids, **kw):
    kw.setdefault("do_sample", False)
    with torch.no_grad():
        return model.generate(input_ids=ids, max_new_tokens=NEW, **kw)


def verified(stats):
    """Each verification forward adds its accepted drafts + 1 token; the prefill adds one per call."""
    return stats["accepted_tokens"] + stats["verify_forwards"] + stats["calls"]


# Aggressive drafting (no confidence stop, long drafts) so verification does real work on random weights.
EAGER = dict(confidence=0.0, max_draft=5, search_trials=10, random_trials=4)


def test_greedy_equals_plain_generate_on_12_prompts():
    model = tiny_lm("llama", layers=8)
    ps = prompts(12)
    ref = [plain(model, p) for p in ps]
    with mmskip.applied(model, SelfSpeculativeConfig(**EAGER)) as handle:
        out = [plain(model, p) for p in ps]
        stats = handle.stats()
    for a, b in zip(ref, out):
        assert torch.equal(a, b)
    assert stats["drafted_tokens"] > 0 and 0 < stats["accepted_tokens"] < stats["drafted_tokens"]
    assert stats["generated_tokens"] == 12 * NEW == verified(stats)
    assert stats["calls"] == 12
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
        out = model.generate(input_ids=ids, max_new_tokens=NEW, do_sample=True, temperature=0.8, top_p=0.9,
                             return_dict_in_generate=True, output_scores=True, output_logits=True)
        stats = handle.stats()  # both calls: every token is a prefill token or a verified one
        assert stats["drafted_tokens"] > stats["accepted_tokens"]
        assert verified(stats) == stats["generated_tokens"] == 2 * NEW
    seq, P = out.sequences, ids.shape[1]
    assert seq.shape == (1, P + NEW) and torch.equal(seq[:, :P], ids)
    # every token was drawn from the full model's distribution at its position: the logits it was
    # sampled from are a full recompute's, and it lies in the top-p support of the warped scores
    with torch.no_grad():
        full = model(input_ids=seq[:, :-1]).logits[0, P - 1 :]
    torch.testing.assert_close(torch.cat(out.logits), full, atol=1e-4, rtol=1e-4)
    chosen = torch.cat(out.scores).gather(1, seq[0, P:, None])
    assert torch.isfinite(chosen).all()


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


def test_found_layer_set_saves_and_later_applications_skip_the_search(tmp_path):
    """The search runs once per model: the config with the found set, saved and loaded, drafts with
    that set and never searches, and greedy output is still the plain model's."""
    model = tiny_lm("llama", layers=8)
    ps = prompts(2)
    with mmskip.applied(model, SelfSpeculativeConfig(**EAGER)) as handle:
        assert handle.state.found_config() is None
        plain(model, ps[0])
        found = handle.state.found_config()
        searched = handle.stats()
    assert searched["search_evals"] > 0 and found.fixed
    loaded = mmskip.SkipConfig.from_pretrained(found.save_pretrained(tmp_path))
    assert loaded == found
    ref = plain(model, ps[1])
    with mmskip.applied(model, loaded) as handle:
        assert torch.equal(plain(model, ps[1]), ref)
        stats = handle.stats()
    assert stats["search_evals"] == 0 and stats["layer_set"] == searched["layer_set"] and stats["drafted_tokens"] > 0


def test_remove_restores_generate_and_outputs():
    model = tiny_lm("llama", layers=6)
    ids = prompts(1)[0]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    handle = mmskip.apply(model, SelfSpeculativeConfig(**EAGER))
    assert "generate" in model.__dict__
    plain(model, ids)
    handle.remove()
    assert "generate" not in model.__dict__
    for module in model.modules():
        assert "forward" not in module.__dict__ and "_diffusers_hook" not in module.__dict__
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_bad_input():
    # what generate() cannot run through SWIFT falls back to transformers: tests/test_speculative_interface.py
    model = tiny_lm("llama", layers=6)
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


def test_zoo_lm_greedy_equality_on_10_held_out_prompts():
    from mmskip import zoo

    try:
        zoo.path("stdlib-lm")
    except FileNotFoundError:
        pytest.skip("the zoo's stdlib-lm is not trained here (mmskip zoo stdlib-lm)")
    from mmskip.zoo.stdlib_data import read_texts

    model, tok = zoo.load("stdlib-lm")
    model = model.float()
    ps = []
    for text in read_texts("test"):
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if ids.shape[1] >= 96:
            ps.append(ids[:, ids.shape[1] // 3 : ids.shape[1] // 3 + 32])
        if len(ps) == 10:
            break
    ref = [plain(model, p) for p in ps]
    with mmskip.applied(model, SelfSpeculativeConfig(search_trials=12, random_trials=6)) as handle:
        out = [plain(model, p) for p in ps]
        stats = handle.stats()
    assert len(ps) == 10 and stats["generated_tokens"] == 10 * NEW == verified(stats)
    for a, b in zip(ref, out):
        assert torch.equal(a, b)




def test_scores_and_logits_processors_are_transformers():
    """Sampling warpers and processors are transformers' own: the distribution SWIFT samples the
    first token from is plain generate's, and greedy decoding with processors that read the prefix
    (repetition penalty, n-gram ban, minimum length) keeps plain's tokens and scores."""
    model = tiny_lm("llama", layers=6)
    ids = prompts(1)[0]
    for kw in ({}, {"temperature": 0.7, "top_p": 0.8}, {"top_k": 5}):
        args = dict(input_ids=ids, max_new_tokens=1, do_sample=True, return_dict_in_generate=True, output_scores=True,
                    **kw)
        ref = model.generate(**args)
        with mmskip.applied(model, SelfSpeculativeConfig(**EAGER)):
            out = model.generate(**args)
        torch.testing.assert_close(out.scores[0], ref.scores[0], atol=1e-5, rtol=1e-5)
    kw = dict(input_ids=ids, max_new_tokens=NEW, do_sample=False, repetition_penalty=1.5, no_repeat_ngram_size=2,
              min_new_tokens=4, return_dict_in_generate=True, output_scores=True)
    ref = model.generate(**kw)
    with mmskip.applied(model, SelfSpeculativeConfig(attn_skip=(2,), mlp_skip=(1, 3), confidence=0.0, max_draft=4)) as h:
        out = model.generate(**kw)
        assert h.stats()["drafted_tokens"] > 0
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.scores) == len(ref.scores) == NEW
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_draft_skips_through_the_shared_skip_unit_hook():
    """The draft is the shared SkipUnitHook on each candidate unit; inside a draft forward the model
    computes what independent torch hooks compute (attention / MLP adding nothing, a layer with
    both skipped passing its input on), outside it the untouched model."""
    model = tiny_lm("llama", layers=6)
    ids = prompts(1)[0]
    attn, mlp = (2, 3), (3, 4)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        hooks = [model.model.layers[3].register_forward_hook(lambda m, a, out: a[0]),
                 model.model.layers[2].self_attn.register_forward_hook(lambda m, a, out: (torch.zeros_like(out[0]), None)),
                 model.model.layers[4].mlp.register_forward_hook(lambda m, a, out: torch.zeros_like(out))]
        ref = model(input_ids=ids).logits
        for h in hooks:
            h.remove()
    with mmskip.applied(model, SelfSpeculativeConfig(attn_skip=attn, mlp_skip=mlp)) as handle:
        draft = handle.state.draft
        for i in {2, 3, 4}:
            for unit in (model.model.layers[i], model.model.layers[i].self_attn, model.model.layers[i].mlp):
                assert isinstance(unit._diffusers_hook.get_hook("mmskip.self_speculative.draft"), SkipUnitHook)
        with torch.no_grad():
            with draft.drafting():
                drafted = model(input_ids=ids).logits
            after = model(input_ids=ids).logits
    torch.testing.assert_close(drafted, ref)
    assert not torch.allclose(drafted, full)
    assert torch.equal(after, full)


def tiny_mistral(window):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        sliding_window=window, pad_token_id=0, eos_token_id=None, bos_token_id=None)
    model = MistralForCausalLM(cfg).eval()
    model.generation_config.pad_token_id = 0
    return model


def test_sliding_window_cache_mistral():
    """Mistral's sliding-window cache layers (window 8, shorter than prompt + generated length) are
    rolled back and trimmed correctly: greedy output equals plain generate's."""
    model = tiny_mistral(window=8)
    ps = prompts(4, seed=6)
    ref = [plain(model, p) for p in ps]
    with mmskip.applied(model, SelfSpeculativeConfig(**EAGER)) as handle:
        out = [plain(model, p, return_dict_in_generate=True) for p in ps]
        stats = handle.stats()
    for a, b in zip(ref, out):
        assert torch.equal(a, b.sequences)
    assert type(out[0].cache.layers[0]).__name__ == "DynamicSlidingWindowLayer"
    assert stats["drafted_tokens"] > stats["accepted_tokens"] > 0
    assert verified(stats) == stats["generated_tokens"] == 4 * NEW


@pytest.mark.parametrize(
    "kw", [dict(max_length=5), dict(do_sample=True, temperature=0.0, max_new_tokens=3)], ids=["max_length", "temp0"]
)
def test_invalid_generation_arguments_raise_as_plain_generate_does(kw):
    model = tiny_lm("llama", layers=4)
    ids = prompts(1)[0]
    with pytest.raises(ValueError) as plain_err:
        model.generate(input_ids=ids, **kw)
    with mmskip.applied(model, SelfSpeculativeConfig(**EAGER)):
        with pytest.raises(ValueError) as swift_err:
            model.generate(input_ids=ids, **kw)
    assert str(swift_err.value) == str(plain_err.value)


def test_explicit_custom_generate_and_streamer():
    """``custom_generate=swift_decode`` is the same loop; a streamer sees the prompt, then every token."""
    model = tiny_lm("llama", layers=6)
    ids = prompts(1, seed=8)[0]
    ref = plain(model, ids)

    class Collect:
        def __init__(self):
            self.parts, self.ended = [], False

        def put(self, value):
            self.parts.append(value.reshape(-1))

        def end(self):
            self.ended = True

    streamer = Collect()
    with mmskip.applied(model, SelfSpeculativeConfig(attn_skip=(2,), mlp_skip=(3,), confidence=0.0)) as handle:
        out = type(model).generate(model, input_ids=ids, max_new_tokens=NEW, do_sample=False,
                                   custom_generate=swift_decode)
        streamed = plain(model, ids, streamer=streamer)
        assert handle.stats()["calls"] == 2
    assert torch.equal(out, ref) and torch.equal(streamed, ref)
    assert streamer.ended and torch.equal(torch.cat(streamer.parts), ref[0])
