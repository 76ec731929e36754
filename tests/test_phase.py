"""Layer-level techniques under everything ``generate`` does: no cache, static cache, a compiled
decoding step, attention outputs (GitHub issue 19, items 1-3 and 5)."""

import pytest
import torch
from transformers import CompileConfig

import mmskip
from mmskip import schedules

from .conftest import tiny_lm

KW = dict(max_new_tokens=6, do_sample=False)

CONFIGS = {
    "layer_skip_decode": lambda: mmskip.LayerSkipConfig(schedule=schedules.explicit(skip=[2, 4]), phase="decode"),
    "layer_skip_all": lambda: mmskip.LayerSkipConfig(schedule=schedules.explicit(skip=[2, 4]), phase="all"),
    "ffn_skip": lambda: mmskip.FFNSkipConfig(schedule=schedules.adaptive(0.5, "cosine", warmup=2, max_skip=0.5),
                                             cold=(1, 0), span=1),
    "void_layers": lambda: mmskip.VoidLayerConfig(schedule=schedules.adaptive(0.9, "l2_change", max_skip=0.5),
                                                  min_void_fraction=0.1),
}


@pytest.fixture(scope="module")
def model():
    return tiny_lm("llama", layers=6)


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(3))


def _generate(model, ids, **kw):
    with torch.no_grad():
        return model.generate(ids, **KW, **kw)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cache_free_static_and_dynamic_generation_agree(model, prompt, name):
    """use_cache=False recomputes the prompt each step; decode-phase skipping still applies to the
    generated tokens only, so all three caches give the same tokens, and they differ from the
    unmodified model's (the technique really skips)."""
    plain = _generate(model, prompt)
    with mmskip.applied(model, CONFIGS[name]()) as handle:
        dynamic = _generate(model, prompt)
        no_cache = _generate(model, prompt, use_cache=False)
        static = _generate(model, prompt, cache_implementation="static")
        stats = handle.stats()
        assert "generate" in model.__dict__  # bound to track where generations start
    assert "generate" not in model.__dict__  # unbound by remove()
    assert torch.equal(no_cache, dynamic)
    assert torch.equal(static, dynamic)
    assert not torch.equal(dynamic, plain)
    assert sum(v["skipped"] for v in stats["items"].values()) > 0


def test_plain_forward_without_cache_is_a_prompt(model, prompt):
    """Outside generate a cache-free forward is a prompt: decode-phase skipping leaves it alone."""
    with torch.no_grad():
        ref = model(prompt, use_cache=False).logits
        with mmskip.applied(model, CONFIGS["layer_skip_decode"]()):
            for _ in range(2):
                torch.testing.assert_close(model(prompt, use_cache=False).logits, ref, rtol=0, atol=0)


def test_static_cache_holds_copied_kv_for_skipped_layers(model, prompt):
    with mmskip.applied(model, CONFIGS["layer_skip_decode"]()):
        out = model.generate(prompt, cache_implementation="static", return_dict_in_generate=True, **KW)
    cache, P = out.past_key_values, prompt.shape[1]
    n = P + KW["max_new_tokens"] - 1
    assert all(int(layer.cumulative_length) == n for layer in cache.layers)
    # generated tokens: layer 2 holds layer 1's K/V, layer 4 holds layer 3's; the prompt's are its own
    for skipped, source in ((2, 1), (4, 3)):
        assert torch.equal(cache.layers[skipped].keys[:, :, P:n], cache.layers[source].keys[:, :, P:n])
        assert not torch.equal(cache.layers[skipped].keys[:, :, :P], cache.layers[source].keys[:, :, :P])


@pytest.mark.parametrize("name", ["layer_skip_decode", "layer_skip_all", "ffn_skip"])
def test_fullgraph_compiled_forward_matches_eager_without_recompiles(model, prompt, name):
    """torch.compile(fullgraph=True) traces the techniques' hooks (dynamo only: backend="eager");
    a second generate reuses the graphs (fail_on_recompile) and gives the same tokens."""
    torch._dynamo.reset()
    with mmskip.applied(model, CONFIGS[name]()):
        eager = _generate(model, prompt, cache_implementation="static")
        model.forward = torch.compile(model.forward, fullgraph=True, backend="eager")
        try:
            first = _generate(model, prompt, cache_implementation="static")
            with torch.compiler.set_stance("fail_on_recompile"):
                second = _generate(model, prompt, cache_implementation="static")
        finally:
            del model.forward
    assert torch.equal(first, eager) and torch.equal(second, eager)


def test_void_layers_with_transformers_compiled_decoding(model, prompt):
    """The prompt decides void layers (data-dependent, so eager, as generate runs every prefill);
    the compiled decoding step skips them."""
    torch._dynamo.reset()
    config = CompileConfig(fullgraph=True, backend="eager")
    config._compile_all_devices = True  # transformers compiles on CPU only when asked
    with mmskip.applied(model, CONFIGS["void_layers"]()) as handle:
        eager = _generate(model, prompt)
        compiled = _generate(model, prompt, cache_implementation="static", compile_config=config)
        assert handle.stats()["skipped_layers"]
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("phase", ["decode", "all"])
def test_attentions_keep_one_entry_per_layer(phase, prompt):
    model = tiny_lm("llama", layers=6)
    model.set_attn_implementation("eager")
    config = mmskip.LayerSkipConfig(schedule=schedules.explicit(skip=[2, 4]), phase=phase)
    with mmskip.applied(model, config), torch.no_grad():
        out = model(prompt, output_attentions=True)
        gen = model.generate(prompt, output_attentions=True, return_dict_in_generate=True, **KW)
    assert len(out.attentions) == 6
    assert all(a.shape == (2, 4, 8, 8) for a in out.attentions)
    assert (out.attentions[2] == 0).all() == (phase == "all")
    assert [len(step) for step in gen.attentions] == [6] * KW["max_new_tokens"]
    last = gen.attentions[-1]
    assert all(a.shape == (2, 4, 1, 8 + KW["max_new_tokens"] - 1) for a in last)
    assert (last[2] == 0).all() and (last[4] == 0).all() and not (last[3] == 0).all()


def test_sdpa_attentions_stay_empty(model, prompt):
    """sdpa returns no attention weights; a skipped layer adds no zeros of its own."""
    with mmskip.applied(model, mmskip.LayerSkipConfig(schedule=schedules.explicit(skip=[2]), phase="all")):
        out = model(prompt, output_attentions=True)
    assert not out.attentions


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_static_cache_prompt_keeps_its_padding_mask(family, padded_batch):
    """With a static cache generate hands the decoder a 4-D mask (or a dict of them per attention
    type); the prompt's padding is read back from it, so void layers decide as with a dynamic cache."""
    ids, mask = padded_batch
    model = tiny_lm(family, layers=6)
    config = CONFIGS["void_layers"]()
    with mmskip.applied(model, config) as handle:
        dynamic = _generate(model, ids, attention_mask=mask)
        skipped = handle.stats()["skipped_layers"]
        static = _generate(model, ids, attention_mask=mask, cache_implementation="static")
        records = handle.state.records
        assert handle.stats()["skipped_layers"] == skipped
    assert torch.equal(static, dynamic)
    assert torch.equal(records[-1].valid, mask.bool()) and torch.equal(records[0].valid, mask.bool())


@pytest.mark.parametrize("name", ["layer_skip_decode", "ffn_skip"])
def test_chunked_prefill_is_all_prompt(model, prompt, name):
    """generate(prefill_chunk_size=...) runs the prompt in several forwards; every chunk is prompt
    (no decode-phase skipping), so the tokens equal an unchunked prefill's."""
    with mmskip.applied(model, CONFIGS[name]()):
        whole = _generate(model, prompt)
        chunked = _generate(model, prompt, prefill_chunk_size=3)
    assert torch.equal(chunked, whole)
