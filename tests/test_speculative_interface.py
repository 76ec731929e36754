"""SWIFT behind transformers' ``generate`` interface: what it serves (losslessly, with transformers'
logits processors and stopping criteria), and what it hands to transformers' own ``generate``
(exactly plain ``generate``'s output, one warning per reason per handle)."""

import warnings

import pytest
import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

import mmskip
from mmskip.swift import SelfSpeculativeConfig, swift_decode

from .conftest import tiny_lm

NEW = 12
FIXED = dict(attn_skip=(2,), mlp_skip=(1, 3), confidence=0.0, max_draft=4)  # drafts on a 6-layer model
FALLING = "falling back to transformers' generate"


def prompt(length=10, seed=0, batch=1):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def gen(model, **kw):
    torch.manual_seed(0)
    kw.setdefault("max_new_tokens", NEW)
    kw.setdefault("do_sample", False)
    with torch.no_grad():
        return model.generate(**kw)


def same(a, b):
    """Equal generate results: sequences, and every tensor of a dict output (scores, attentions, ...)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if a is None or isinstance(a, (int, float, str)):
        return a == b
    keys = [k for k in a.keys() if k not in ("cache", "past_key_values")]
    return keys == [k for k in b.keys() if k not in ("cache", "past_key_values")] and all(same(a[k], b[k]) for k in keys)


class Collect:
    """A streamer that records what it is given."""

    def __init__(self):
        self.parts, self.ended = [], False

    def put(self, value):
        self.parts.append(value.reshape(-1).clone())

    def end(self):
        self.ended = True


class StopAt(StoppingCriteria):
    """Stops after ``token``; records the scores transformers hands the criterion (all so far, or None)."""

    def __init__(self, token):
        self.token, self.seen = token, []

    def __call__(self, input_ids, scores, **kwargs):
        self.seen.append(None if scores is None else torch.cat(scores))
        return input_ids[:, -1] == self.token


def test_processors_and_stopping_criteria_are_applied_per_verified_token():
    """Repetition penalty, bad words, n-gram ban, min/max length, EOS and a custom StoppingCriteria
    act on every verified position as in plain generate: SWIFT's greedy output, scores, logits and
    the scores the criterion sees are plain generate's."""
    model = tiny_lm("llama", layers=6)
    ids = prompt()
    P = ids.shape[1]
    base = dict(input_ids=ids, max_new_tokens=16, repetition_penalty=1.5, no_repeat_ngram_size=2)
    pen = gen(model, **base)
    calls = [
        dict(base, bad_words_ids=[[int(pen[0, P + 3])]], min_new_tokens=4, return_dict_in_generate=True,
             output_scores=True, output_logits=True),
        dict(base, eos_token_id=int(pen[0, P + 2]), min_new_tokens=6),  # EOS suppressed until 6 new tokens
        dict(base, max_new_tokens=None, max_length=P + 7),
    ]
    refs = [gen(model, **kw) for kw in calls]
    stop_ref = StopAt(int(pen[0, P + 10]))
    with_scores = dict(base, return_dict_in_generate=True, output_scores=True)
    refs.append(gen(model, **with_scores, stopping_criteria=StoppingCriteriaList([stop_ref])).sequences)
    with mmskip.applied(model, SelfSpeculativeConfig(**FIXED)) as handle:
        outs = [gen(model, **kw) for kw in calls]
        stop = StopAt(stop_ref.token)
        outs.append(gen(model, **with_scores, stopping_criteria=StoppingCriteriaList([stop])).sequences)
        stats = handle.stats()
    assert stats["calls"] == 4 and stats["fallback_calls"] == 0 and stats["drafted_tokens"] > 0
    for ref, out in zip(refs, outs):
        assert torch.equal(out if isinstance(out, torch.Tensor) else out.sequences,
                           ref if isinstance(ref, torch.Tensor) else ref.sequences)
    assert not torch.equal(refs[0].sequences, pen[:, : refs[0].sequences.shape[1]])  # the ban changed the output
    assert refs[1].shape[1] > P + 6 and int(refs[1][0, -1]) == int(pen[0, P + 2])
    assert refs[2].shape[1] == P + 7 and refs[3].shape[1] == P + 11
    for name in ("scores", "logits"):
        assert len(outs[0][name]) == len(refs[0][name])
        for a, b in zip(outs[0][name], refs[0][name]):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert len(stop.seen) == len(stop_ref.seen) == 11
    for a, b in zip(stop.seen, stop_ref.seen):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE({chr(33 + i): i for i in range(128)}, merges=[]))  # one character per id
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _prefilled(model, ids):
    with torch.no_grad():
        return model(input_ids=ids[:, :-2], use_cache=True).cache


def _left_padded_batch(model):
    ids = prompt(batch=3, seed=1)
    mask = torch.ones_like(ids)
    mask[1, :3] = mask[2, :5] = 0
    return dict(input_ids=ids.masked_fill(mask == 0, 0), attention_mask=mask)


def _holed_mask(model):
    mask = torch.ones_like(prompt())
    mask[0, 4] = 0
    return dict(input_ids=prompt(), attention_mask=mask)


# (id, family, kwargs of the call given the model, reason key, warning text)
FALLBACKS = [
    ("batch", "llama", _left_padded_batch, "batch", r"batch size 1 only \(got batch 3\)"),
    ("num_return_sequences", "llama", lambda m: dict(input_ids=prompt(), do_sample=True, num_return_sequences=2),
     "batch", "got batch 2"),
    ("num_beams", "llama", lambda m: dict(input_ids=prompt(), num_beams=2), "num_beams", "greedily or by sampling"),
    ("inputs_embeds", "llama", lambda m: dict(inputs_embeds=m.model.embed_tokens(prompt()).detach()), "inputs_embeds",
     "got inputs_embeds"),
    ("assistant_model", "llama", lambda m: dict(input_ids=prompt(), assistant_model=tiny_lm("llama", 2, seed=1)),
     "assisted", "assistant_model"),
    ("prompt_lookup", "llama", lambda m: dict(input_ids=prompt(), prompt_lookup_num_tokens=2), "assisted",
     "assisted_generation"),
    ("static_cache", "llama", lambda m: dict(input_ids=prompt(), cache_implementation="static"), "cache",
     "got StaticCache"),
    ("prefilled_cache", "llama", lambda m: dict(input_ids=prompt(), cache=_prefilled(m, prompt())), "cache",
     "empty cache"),
    ("use_cache", "llama", lambda m: dict(input_ids=prompt(), use_cache=False), "use_cache", "use_cache=False"),
    ("output_attentions", "llama", lambda m: dict(input_ids=prompt(), output_attentions=True,
                                                  return_dict_in_generate=True), "outputs", "attentions"),
    ("output_hidden_states", "llama", lambda m: dict(input_ids=prompt(), output_hidden_states=True,
                                                     return_dict_in_generate=True), "outputs", "hidden states"),
    ("guidance", "llama", lambda m: dict(input_ids=prompt(), guidance_scale=1.5), "guidance", "guidance_scale"),
    ("attention_mask", "llama", _holed_mask, "attention_mask", "left padding"),
    ("stop_strings", "llama", lambda m: dict(input_ids=prompt(), stop_strings=["/x"], tokenizer=_tokenizer()),
     "tokenizer", "stop_strings"),
    ("token_type_ids", "gpt2", lambda m: dict(input_ids=prompt(), token_type_ids=torch.ones_like(prompt())),
     "model_inputs", "token_type_ids"),
]


@pytest.mark.parametrize("family,call,key,text", [c[1:] for c in FALLBACKS], ids=[c[0] for c in FALLBACKS])
def test_fallback_is_plain_generate_and_warns_once(family, call, key, text):
    model = tiny_lm(family, layers=6)
    with torch.no_grad():
        before = model(input_ids=prompt()).logits
    ref = gen(model, **call(model))
    handle = mmskip.apply(model, SelfSpeculativeConfig(**FIXED))
    with pytest.warns(UserWarning, match=text) as caught:
        out = gen(model, **call(model))
    assert sum(FALLING in str(w.message) for w in caught) == 1
    with warnings.catch_warnings(record=True) as again_caught:
        warnings.simplefilter("always")
        again = gen(model, **call(model))
    assert not [w for w in again_caught if FALLING in str(w.message)]  # once per reason per handle
    stats = handle.stats()
    assert stats["calls"] == 0 and stats["fallback_calls"] == 2 and stats["fallbacks"] == {key: 2}
    assert same(out, ref) and same(again, ref)
    handle.remove()
    assert "generate" not in model.__dict__
    with torch.no_grad():
        assert torch.equal(model(input_ids=prompt()).logits, before)
    assert same(gen(model, **call(model)), ref)


def test_default_values_count_as_absent():
    """``streamer=None``, ``past_key_values=None``, ``output_scores=False`` ... are served by SWIFT, as is
    an empty cache the caller passes; no warning."""
    model = tiny_lm("llama", layers=6)
    ids = prompt(seed=2)
    ref = gen(model, input_ids=ids)
    defaults = dict(streamer=None, past_key_values=None, output_scores=False, output_logits=False,
                    output_attentions=False, output_hidden_states=False, assistant_model=None, num_beams=1,
                    num_return_sequences=1, use_cache=True, cache_implementation="dynamic", inputs_embeds=None,
                    synced_gpus=False, tokenizer=None, stop_strings=None, guidance_scale=None, repetition_penalty=None,
                    bad_words_ids=None, prompt_lookup_num_tokens=None, attention_mask=torch.ones_like(ids))
    with mmskip.applied(model, SelfSpeculativeConfig(**FIXED)) as handle:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outs = [gen(model, input_ids=ids, **defaults), gen(model, input_ids=ids, past_key_values=DynamicCache())]
        stats = handle.stats()
    assert not [w for w in caught if FALLING in str(w.message)]
    assert stats["calls"] == 2 and stats["fallback_calls"] == 0 and stats["drafted_tokens"] > 0
    assert all(torch.equal(out, ref) for out in outs)


def test_streamer_on_both_paths_and_explicit_custom_generate_refuses():
    """A streamer sees the prompt once, then the tokens, whether SWIFT serves the call or transformers
    does; ``custom_generate=swift_decode`` given explicitly cannot fall back and says so."""
    model = tiny_lm("llama", layers=6)
    ids = prompt(seed=3)
    plain_stream, swift_stream, fallback_stream = Collect(), Collect(), Collect()
    ref = gen(model, input_ids=ids, streamer=plain_stream)
    with mmskip.applied(model, SelfSpeculativeConfig(**FIXED)) as handle:
        assert torch.equal(gen(model, input_ids=ids, streamer=swift_stream), ref)
        with pytest.warns(UserWarning, match="use_cache=False"):
            assert torch.equal(gen(model, input_ids=ids, streamer=fallback_stream, use_cache=False), ref)
        with pytest.raises(ValueError, match=r"batch size 1 only.*custom_generate=swift_decode cannot fall back"):
            gen(model, input_ids=prompt(batch=2), custom_generate=swift_decode)
        stats = handle.stats()
    assert stats["calls"] == 1 and stats["fallbacks"] == {"use_cache": 1}
    for streamer in (plain_stream, swift_stream, fallback_stream):
        assert streamer.ended and torch.equal(torch.cat(streamer.parts), ref[0])
        assert torch.equal(streamer.parts[0], ids[0])


def test_refuses_a_model_without_generate():
    """A bare decoder stack (LlamaModel) has nothing to decode with: a clear error, nothing bound."""
    from transformers import LlamaConfig, LlamaModel

    base = LlamaModel(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                  num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(TypeError, match="LlamaForCausalLM, not LlamaModel"):
        mmskip.apply(base, mmskip.SelfSpeculativeConfig())
    assert "generate" not in base.__dict__ and not hasattr(base, "_diffusers_hook")


@pytest.mark.parametrize("value", [float("nan"), 5.0, -1.0, float("inf")])
def test_target_score_outside_zero_one_is_refused(value):
    with pytest.raises(ValueError, match=r"target_score .*must lie in \[0, 1\], got"):
        SelfSpeculativeConfig(target_score=value)
    assert SelfSpeculativeConfig(target_score=1.0).target_score == 1.0
