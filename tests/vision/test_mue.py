"""MuE early exits (encoder by modality, decoder per token) on a tiny random Florence-2, CPU float32."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from mmskip.vision.mue import MuEConfig

import mmskip

from .._ops import op_counts
from ._mue_common import EXITS, NEVER, STEPS, _generate, _hooked, _logits, _rows_run  # noqa: F401
from ._tiny_florence import IMAGE_TOKEN, N_IMAGE, florence_prompts, row, tiny_florence

# -- identity and removal ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def florence():
    return tiny_florence()


@pytest.fixture
def batch():
    return florence_prompts()


@pytest.mark.parametrize("cfg", NEVER, ids=["one", "none", "modality"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_never_triggering_thresholds_are_identical(florence, cfg, padding):
    b = florence_prompts(padding=padding)
    ref, ref_gen = _logits(florence, b), _generate(florence, b)
    with mmskip.applied(florence, cfg) as h:
        assert torch.equal(_logits(florence, b), ref)
        assert torch.equal(_generate(florence, b), ref_gen)
        s = h.stats()
        assert s["skipped"] == 0 and s["flops_fraction"] == 1.0
        assert s["encoder"]["image"]["tokens"] == 3 * N_IMAGE  # captured inside generate too
        assert s["encoder"]["image"]["skipped"] == s["encoder"]["text"]["skipped"] == s["decoder"]["skipped"] == 0


@pytest.mark.parametrize("cfg", NEVER, ids=["one", "none", "modality"])
def test_never_triggering_thresholds_cost_nothing_per_step(florence, batch, cfg):
    """No exit can trigger: no layer hook, no similarity or exit mask; what runs on top of the
    plain model (the image mask's read, the encoder record) is the same for 2 and 5 new tokens."""

    def gen(n):
        with torch.no_grad():
            return florence.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    layers = [*florence.model.language_model.encoder.layers, *florence.model.language_model.decoder.layers]
    extra = []
    for n in (2, 5):
        ref, plain = op_counts(lambda n=n: gen(n))
        with mmskip.applied(florence, cfg) as h:
            assert not any("_diffusers_hook" in m.__dict__ for layer in layers for m in layer.modules())
            out, zero = op_counts(lambda n=n: gen(n))
            s = h.stats()["decoder"]
            exits = h.state.decoder_exits
        assert torch.equal(out, ref) and plain - zero == Counter()
        extra.append(zero - plain)
        assert s["tokens"] == 3 * n and s["skipped"] == 0 and torch.equal(exits, torch.full((3, n), s["layers"]))
    assert extra[0] == extra[1] and sum(extra[0].values()) <= 8


def test_remove_restores_exact_outputs(florence, batch):
    ref, ref_gen = _logits(florence, batch), _generate(florence, batch)
    h = mmskip.apply(florence, EXITS)
    assert "get_placeholder_mask" in florence.model.__dict__
    assert not torch.allclose(_logits(florence, batch), ref)  # it does change something
    h.remove()
    assert not _hooked(florence)
    assert not any("forward" in m.__dict__ for m in florence.modules())
    assert "get_placeholder_mask" not in florence.model.__dict__
    assert torch.equal(_logits(florence, batch), ref)
    assert torch.equal(_generate(florence, batch), ref_gen)


# -- the encoder: exits by modality, packed queries ----------------------------------------------


def test_encoder_exits_by_modality(florence, batch):
    """Image and text tokens follow their own thresholds; a modality with None runs every layer."""
    valid = batch["attention_mask"].bool()
    image = batch["input_ids"] == IMAGE_TOKEN
    for img, txt in ((None, 0.94), (0.96, None)):
        cfg = MuEConfig(image_threshold=img, text_threshold=txt, decoder_threshold=None)
        with mmskip.applied(florence, cfg) as h:
            _logits(florence, batch)
            ex, s = h.state.encoder_record.exit_layer, h.stats()["encoder"]
        never, exits = (image, ~image) if img is None else (~image, image)
        assert (ex[never & valid] == 4).all()
        assert (ex[exits & valid] < 4).any()
        assert (ex[~valid] == 0).all()
        assert s["image"]["tokens"] == int(image.sum()) and s["text"]["tokens"] == int((valid & ~image).sum())
        name = "image" if img is not None else "text"
        assert s[name]["skipped"] == 4 * s[name]["tokens"] - int(ex[exits & valid].sum()) > 0
        assert s[name]["mean_exit_layer"] == pytest.approx(float(ex[exits & valid].float().mean()))


def test_exited_tokens_do_not_run_and_counts_agree(florence, batch):
    """Each encoder layer's FFN sees exactly the packed running tokens (max per row x batch); the
    FLOPs items say the same; an exited token's state passes the remaining layers unchanged."""
    seen, hooks = _rows_run(florence, "encoder")
    try:
        with mmskip.applied(florence, MuEConfig(image_threshold=0.96, text_threshold=0.94, decoder_threshold=None)) as h:
            with torch.no_grad():
                out = florence(**batch, decoder_input_ids=torch.full((3, 1), 2), output_hidden_states=True)
            ex, stats = h.state.encoder_record.exit_layer, h.stats()
    finally:
        for hk in hooks:
            hk.remove()
    B, N = batch["input_ids"].shape
    valid = batch["attention_mask"].bool()
    for i in range(4):
        packed = bool((ex[valid] <= i).any())  # some token exited before layer i
        P = int((ex > i).sum(1).max()) if packed else N  # the most tokens a row still runs
        assert seen.get(i, 0) == B * P
        assert stats["items"][f"encoder.{i}"] == {"executed": B * P, "skipped": B * (N - P)}
        assert stats["items"][f"encoder.{i}.kv"]["skipped"] == (B * N if P == 0 else 0)
    assert stats["flops_fraction"] < 1.0
    states = out.encoder_hidden_states  # embeddings + each layer's output
    for b in range(B):
        for n in range(N):
            e = int(ex[b, n])
            if 0 < e < 4:
                assert torch.equal(states[e][b, n], states[-1][b, n])


def test_packed_layer_matches_the_plain_layer(florence, batch):
    """A packed encoder layer (running tokens as queries, every token as key/value) gives the
    running tokens what the plain layer gives them on the full sequence; exited tokens pass."""
    layers = florence.model.language_model.encoder.layers
    seen = {}
    hooks = [layer.register_forward_hook(lambda m, a, kw, o, i=i: seen.__setitem__(i, (a[0], a[1], o)),
                                         with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with mmskip.applied(florence, MuEConfig(image_threshold=0.96, text_threshold=0.94, decoder_threshold=None)) as h:
            _logits(florence, batch)
            ex = h.state.encoder_record.exit_layer
            checked = 0
            for i in range(1, 4):
                x, mask, out = seen[i]
                running = ex > i
                if not bool((ex[batch["attention_mask"].bool()] <= i).any()):
                    continue  # nothing has exited before layer i: the plain layer ran
                with torch.no_grad():
                    ref = layers[i](x, mask)  # outside an encoder pass the hook runs the plain layer
                torch.testing.assert_close(out[running], ref[running], atol=1e-5, rtol=1e-5)
                exited = (ex <= i) & batch["attention_mask"].bool()
                assert torch.equal(out[exited], x[exited])
                checked += 1
    finally:
        for hk in hooks:
            hk.remove()
    assert checked >= 1


def test_modality_granularity_exits_whole_blocks(florence, batch):
    """The authors' rule: per row and modality, one cosine over the modality's block, one exit layer."""
    cfg = MuEConfig(image_threshold=0.96, text_threshold=0.94, encoder_granularity="modality", decoder_threshold=None)
    with mmskip.applied(florence, cfg) as h:
        _logits(florence, batch)
        ex = h.state.encoder_record.exit_layer
    valid, image = batch["attention_mask"].bool(), batch["input_ids"] == IMAGE_TOKEN
    layers = set()
    for b in range(ex.shape[0]):
        for sel in (valid[b] & image[b], valid[b] & ~image[b]):
            assert ex[b, sel].unique().numel() == 1
            layers.add(int(ex[b, sel][0]))
    assert min(layers) < 4


# -- the decoder: exits per token, threshold decay, KV rule --------------------------------------


def test_decoder_threshold_decay_and_min_layers(florence):
    cfg = MuEConfig(decoder_threshold=0.9, decay=0.5, floor=0.3)
    assert [cfg.decoder_threshold_at(t) for t in range(3)] == [0.9, 0.45, 0.3]
    assert MuEConfig(decoder_threshold=None).decoder_threshold_at(3) is None
    b = row(florence_prompts(), 0)
    # threshold 1.0 at position 0 (never), 0.0 from position 1 on: every later token exits right
    # after min_layers layers; the deeper layers only compute its K/V
    for min_layers in (1, 2, 3):
        cfg = MuEConfig(image_threshold=None, text_threshold=None, decoder_threshold=1.0, decay=1e-9, floor=0.0,
                        min_layers=min_layers)
        seen, hooks = _rows_run(florence, "decoder")
        try:
            with mmskip.applied(florence, cfg) as h:
                with torch.no_grad():
                    out = florence.generate(**b, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True)
                exits, s = h.state.decoder_exits, h.stats()["decoder"]
        finally:
            for hk in hooks:
                hk.remove()
        assert exits.tolist() == [[4] + [min_layers] * (STEPS - 1)]
        assert s["min_layers"] == min_layers and s["skipped"] == (STEPS - 1) * (4 - min_layers)
        assert s["computed_anyway"] == 0
        for i in range(4):
            assert seen[i] == (1 if i >= min_layers else STEPS)  # only position 0 runs the deep layers
        cache = out.cache.self_attention_cache
        assert all(cache.layers[i].keys.shape[-2] == STEPS for i in range(4))  # every layer has every token
    assert MuEConfig(decoder_threshold=0.9).decoder_threshold_at(0) == 0.9


def test_kv_rule_copies_the_exit_state(florence, batch):
    """A deeper layer's cached K/V for an exited token are that layer's K/V projections of the
    exit layer's output (state copying), which is also the token's final hidden state."""
    with mmskip.applied(florence, EXITS) as h:
        with torch.no_grad():
            out = florence.generate(**batch, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
                                    output_hidden_states=True)
        exits = h.state.decoder_exits
    layers = florence.model.language_model.decoder.layers
    cache = out.cache.self_attention_cache
    checked = 0
    for b in range(exits.shape[0]):
        for t in range(exits.shape[1]):
            e = int(exits[b, t])
            states = out.decoder_hidden_states[t]  # embeddings + each layer's output, this step
            final = states[-1][b, -1]
            if e == 4:
                continue
            assert torch.equal(states[e][b, -1], final)
            for i in range(e, 4):
                attn = layers[i].self_attn
                with torch.no_grad():
                    k = attn.k_proj(final).view(-1, attn.head_dim)
                    v = attn.v_proj(final).view(-1, attn.head_dim)
                torch.testing.assert_close(cache.layers[i].keys[b, :, t], k, atol=1e-6, rtol=1e-5)
                torch.testing.assert_close(cache.layers[i].values[b, :, t], v, atol=1e-6, rtol=1e-5)
                checked += 1
    assert checked > 0


@pytest.mark.parametrize("padding,attn,granularity", [("right", "sdpa", "token"), ("left", "sdpa", "modality"),
                                                       ("right", "eager", "token")])
def test_cached_generation_equals_recompute(padding, attn, granularity):
    """Greedy generation with the cache (exited tokens' K/V from their copied state) equals a
    no-cache recompute of every step under the same (pinned) exits."""
    model = tiny_florence(attn=attn)
    b = florence_prompts(padding=padding)
    # a whole modality block is less similar than its most similar tokens: lower encoder thresholds
    img, txt = (0.96, 0.94) if granularity == "modality" else (EXITS.image_threshold, EXITS.text_threshold)
    cfg = MuEConfig(image_threshold=img, text_threshold=txt, encoder_granularity=granularity,
                    decoder_threshold=EXITS.decoder_threshold, decay=0.99, floor=0.85)
    with mmskip.applied(model, cfg) as h:
        with torch.no_grad():
            gen = model.generate(**b, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        s = h.stats()
        assert s["decoder"]["skipped"] > 0 and s["encoder"]["image"]["skipped"] + s["encoder"]["text"]["skipped"] > 0
        h.state.pin_exits()
        assert h.stats()["pinned"]
        for t in range(STEPS):
            full = _logits(model, b, dec=gen.sequences[:, : t + 1], use_cache=False)[:, -1]
            torch.testing.assert_close(full, gen.logits[t], atol=2e-5, rtol=1e-5)
            assert torch.equal(full.argmax(-1), gen.sequences[:, t + 1])
        h.state.unpin_exits()
        assert not h.stats()["pinned"]


def test_each_row_gets_what_it_gets_alone(florence):
    """Exits are per token and per sequence: a right-padded batch (Florence-2's processor pads on
    the right) gives each row its own output and exits; so does a left-padded batch against the
    same padded row alone (BART's encoder positions are absolute, so left padding itself changes
    what the unmodified model computes)."""
    for padding in ("right", "left"):
        b = florence_prompts((7, 3, 1), padding=padding, seed=4)
        with mmskip.applied(florence, EXITS) as h:
            gen = _generate(florence, b)
            enc, dec = h.state.encoder_record.exit_layer, h.state.decoder_exits
            assert len({tuple(r) for r in dec.tolist()}) > 1 and len({tuple(r) for r in gen.tolist()}) > 1
            assert h.stats()["decoder"]["computed_anyway"] > 0  # rows exited at different layers
            for i in range(3):
                alone = row(b, i, trim=padding == "right")
                assert torch.equal(_generate(florence, alone)[0], gen[i])
                n = alone["input_ids"].shape[1]
                at = slice(0, n) if padding == "right" else slice(None)
                assert torch.equal(h.state.encoder_record.exit_layer[0], enc[i, at])
                assert torch.equal(h.state.decoder_exits[0], dec[i])


def test_batch_where_one_row_exits_and_another_does_not(florence, batch):
    """Pinned decoder exits: row 0 exits after layer 2 at every position, row 1 never, row 2 at
    layer 3. The mixed batch runs the deep layers densely and keeps row 0's state; each row gives
    what it gives alone under its own exits."""
    plan = torch.tensor([[2] * (STEPS + 1), [4] * (STEPS + 1), [3] * (STEPS + 1)])
    cfg = MuEConfig(image_threshold=None, text_threshold=None, decoder_threshold=0.9)
    with mmskip.applied(florence, cfg) as h:
        h.state.pinned_decoder = plan
        gen = _generate(florence, batch)
        assert torch.equal(h.state.decoder_exits, plan[:, :STEPS])
        s = h.stats()["decoder"]
        assert s["computed_anyway"] == STEPS * 2 + STEPS  # row 0 in layers 2, 3; row 2 in layer 3
        for i in range(3):
            h.state.pinned_decoder = plan[i: i + 1]
            assert torch.equal(_generate(florence, row(batch, i))[0], gen[i])


def test_exit_at_the_first_step_then_deeper(florence, batch):
    """The first decoder token exits after layer 2, so layers 3-4 never see it run (their
    cross-attention cache stays empty); later tokens run deeper and fill it then. Cached
    generation still equals the pinned no-cache recompute."""
    b = row(batch, 0)
    plan = torch.tensor([[2, 4, 4, 3, 4, 4]])
    with mmskip.applied(florence, MuEConfig(image_threshold=None, text_threshold=None)) as h:
        h.state.pinned_decoder = plan
        with torch.no_grad():
            gen = florence.generate(**b, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True)
        assert torch.equal(h.state.decoder_exits, plan[:, :STEPS])
        for t in range(STEPS):
            full = _logits(florence, b, dec=gen.sequences[:, : t + 1], use_cache=False)[:, -1]
            torch.testing.assert_close(full, gen.logits[t], atol=2e-5, rtol=1e-5)


def test_bfloat16_generation_runs_and_removes_exactly(batch):
    model = tiny_florence().to(torch.bfloat16)
    b = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}
    ref = _logits(model, b)
    with mmskip.applied(model, EXITS) as h:
        out = _generate(model, b)
        assert out.shape == (3, STEPS + 1)
        assert h.stats()["flops_fraction"] < 1.0
    assert torch.equal(_logits(model, b), ref)


# -- bad input -----------------------------------------------------------------------------------


def test_encoder_without_image_tokens(florence, caplog):
    """No image tokens (no pixel_values): every token is text; the text threshold applies; warned once."""
    b = florence_prompts(with_image=False)
    ref, ref_gen = _logits(florence, b), _generate(florence, b)
    with caplog.at_level("WARNING", logger="mmskip.vision.mue"):
        with mmskip.applied(florence, MuEConfig(image_threshold=0.0, text_threshold=1.0, decoder_threshold=None)) as h:
            assert torch.equal(_logits(florence, b), ref)
            assert torch.equal(_generate(florence, b), ref_gen)
            assert h.stats()["encoder"]["image"]["tokens"] == 0
        with mmskip.applied(florence, MuEConfig(text_threshold=0.9, decoder_threshold=None)) as h:
            _logits(florence, b)
            s = h.stats()["encoder"]
            assert s["image"]["tokens"] == 0 and s["text"]["skipped"] > 0
    assert sum("without image tokens" in r.message for r in caplog.records) == 2  # once per application
