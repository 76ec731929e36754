"""MuE on its second encoder-decoder family, a tiny random T5Gemma 2 (pre-norm, rotary, GQA, merged
decoder attention), CPU float32: identity at never-exit thresholds, exact removal, packed encoder
layers, the decoder KV rule (cached generation = no-cache recompute under pinned exits), and the
error for an encoder-decoder family MuE does not know."""

from __future__ import annotations

import pytest
import torch
from mmskip.vision.adapters import T5Gemma2Adapter, UnsupportedLanguageModelError
from mmskip.vision.mue import MuEConfig

import mmskip

from ._mue_common import NEVER, STEPS, _generate, _hooked, _logits
from ._tiny_t5gemma2 import BOS, EXITS, IMAGE_TOKEN, N_IMAGE, t5gemma2_prompts, tiny_t5gemma2


@pytest.fixture(scope="module")
def model():
    return tiny_t5gemma2()


@pytest.fixture
def batch():
    return t5gemma2_prompts()


def _dec(batch: dict) -> torch.Tensor:
    return torch.full((batch["input_ids"].shape[0], 3), BOS)


def test_adapter_finds_the_parts(model):
    adapter = mmskip.registry.get_adapter(model, "encdec-vlm")
    assert isinstance(adapter, T5Gemma2Adapter)
    assert adapter.encoder is model.model.encoder.text_model and adapter.mm_model is model.model.encoder
    assert adapter.num_encoder_layers == adapter.num_decoder_layers == 4
    assert adapter.image_token_id == IMAGE_TOKEN
    assert isinstance(mmskip.registry.get_adapter(model.model, "encdec-vlm"), T5Gemma2Adapter)


@pytest.mark.parametrize("cfg", NEVER, ids=["one", "none", "modality"])
def test_never_triggering_thresholds_are_identical(model, batch, cfg):
    ref, ref_gen = _logits(model, batch, dec=_dec(batch)), _generate(model, batch)
    with mmskip.applied(model, cfg) as h:
        assert torch.equal(_logits(model, batch, dec=_dec(batch)), ref)
        assert torch.equal(_generate(model, batch), ref_gen)
        s = h.stats()
        assert s["skipped"] == 0 and s["flops_fraction"] == 1.0
        assert s["encoder"]["image"]["tokens"] == 3 * N_IMAGE  # the mask is captured inside generate too
        assert s["decoder"]["tokens"] == 3 * STEPS


def test_remove_restores_exactly(model, batch):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ref, ref_gen = _logits(model, batch, dec=_dec(batch)), _generate(model, batch)
    h = mmskip.apply(model, EXITS)
    assert "get_image_placeholder_mask" in model.model.encoder.__dict__
    assert not torch.allclose(_logits(model, batch, dec=_dec(batch)), ref)  # it does change something
    _generate(model, batch)
    assert h.stats()["flops_fraction"] < 1.0
    h.remove()
    assert not _hooked(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert "get_image_placeholder_mask" not in model.model.encoder.__dict__
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert torch.equal(_logits(model, batch, dec=_dec(batch)), ref)
    assert torch.equal(_generate(model, batch), ref_gen)


def test_packed_encoder_layer_matches_the_plain_layer(model, batch):
    """Running tokens as packed queries (their rotary positions and mask rows gathered) over every
    token's keys/values get what the plain layer gives them; exited tokens pass unchanged; each
    layer's MLP sees only the packed rows."""
    layers = model.model.encoder.text_model.layers
    seen, rows = {}, {}
    hooks = [layer.register_forward_hook(lambda m, a, kw, o, i=i: seen.__setitem__(i, (a, o)), with_kwargs=True)
             for i, layer in enumerate(layers)]
    hooks += [layer.mlp.register_forward_hook(lambda m, a, o, i=i: rows.__setitem__(i, a[0].shape[:-1].numel()))
              for i, layer in enumerate(layers)]
    valid = batch["attention_mask"].bool()
    try:
        with mmskip.applied(model, MuEConfig(image_threshold=0.85, text_threshold=0.8, decoder_threshold=None)) as h:
            _logits(model, batch, dec=_dec(batch))
            ex = h.state.encoder_record.exit_layer
            checked = 0
            for i in range(1, 4):
                (x, pos, mask, *rest), out = seen[i]
                if not bool((ex[valid] <= i).any()):
                    continue  # nothing has exited before layer i: the plain layer ran
                P = int((ex > i).sum(1).max())
                assert rows[i] == x.shape[0] * P
                with torch.no_grad():
                    ref = layers[i](x, pos, mask, *rest)  # outside an encoder pass the hook runs the plain layer
                running, exited = ex > i, (ex <= i) & valid
                torch.testing.assert_close(out[running], ref[running], atol=1e-5, rtol=1e-5)
                assert torch.equal(out[exited], x[exited])
                checked += 1
    finally:
        for hk in hooks:
            hk.remove()
    assert checked >= 1
    assert (ex[~valid] == 0).all() and (ex[valid] < 4).any()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_generation_equals_recompute(attn):
    """Greedy generation with the cache (exited tokens' K/V: pre-norm, k_norm and rotary of their
    copied state) equals a no-cache recompute of every step under the same pinned exits."""
    model = tiny_t5gemma2(attn=attn)
    b = t5gemma2_prompts()
    with mmskip.applied(model, EXITS) as h:
        with torch.no_grad():
            gen = model.generate(**b, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        s = h.stats()
        assert s["decoder"]["skipped"] > 0 and s["encoder"]["image"]["skipped"] + s["encoder"]["text"]["skipped"] > 0
        h.state.pin_exits()
        for t in range(STEPS):
            full = _logits(model, b, dec=gen.sequences[:, : t + 1], use_cache=False)[:, -1]
            torch.testing.assert_close(full, gen.logits[t], atol=2e-5, rtol=1e-5)
            assert torch.equal(full.argmax(-1), gen.sequences[:, t + 1])


def test_whole_forward_exits_append_the_layers_kv(model, batch):
    """Pinned exits for one row: position 0 exits after layer 2 (layers 3-4 never run it: their
    cross-attention cache fills later), positions 1 and 4 after layer 1 (layers 2-4 compute only
    their K/V: pre-norm, k_norm, rotary at their position); the others run every layer and attend
    to those K/V. The cache holds every position in every layer; the result equals the pinned
    no-cache recompute."""
    plan = torch.tensor([[2, 1, 4, 4, 1, 4]])
    b = {k: v[:1] for k, v in batch.items()}
    with mmskip.applied(model, MuEConfig(image_threshold=None, text_threshold=None, min_layers=1)) as h:
        h.state.pinned_decoder = plan
        with torch.no_grad():
            gen = model.generate(**b, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        assert torch.equal(h.state.decoder_exits, plan[:, :STEPS])
        assert h.stats()["decoder"]["computed_anyway"] == 0
        cache = gen.cache.self_attention_cache
        assert all(cache.layers[i].keys.shape[-2] == STEPS for i in range(4))
        for t in range(STEPS):
            full = _logits(model, b, dec=gen.sequences[:, : t + 1], use_cache=False)[:, -1]
            torch.testing.assert_close(full, gen.logits[t], atol=2e-5, rtol=1e-5)


def test_each_row_gets_what_it_gets_alone(model, batch):
    with mmskip.applied(model, EXITS) as h:
        gen = _generate(model, batch)
        dec = h.state.decoder_exits
        for i in range(3):
            n = int(batch["attention_mask"][i].sum())
            alone = {k: (v[i: i + 1, :n] if v.dim() == 2 else v[i: i + 1]) for k, v in batch.items()}
            assert torch.equal(_generate(model, alone)[0], gen[i])
            assert torch.equal(h.state.decoder_exits[0], dec[i])


def test_unsupported_families_are_refused():
    """An encoder-decoder model MuE has no adapter for (text-only BART) is refused with the list of
    supported classes; a T5Gemma 2 whose layers lack a part MuE reads says which."""
    from transformers import BartConfig, BartForConditionalGeneration

    bart = BartForConditionalGeneration(BartConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1,
                                                   encoder_attention_heads=2, decoder_attention_heads=2,
                                                   encoder_ffn_dim=32, decoder_ffn_dim=32))
    with pytest.raises(mmskip.UnsupportedModelError, match="BartForConditionalGeneration.*T5Gemma2ForConditional"):
        mmskip.apply(bart, EXITS)
    assert not _hooked(bart)
    model = tiny_t5gemma2(layers=2)
    del model.model.decoder.layers[0].self_attn.k_norm
    with pytest.raises(UnsupportedLanguageModelError, match="decoder layer has no self_attn.k_norm"):
        mmskip.apply(model, EXITS)
    assert not _hooked(model)
