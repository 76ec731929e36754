"""p-MoD vision-token skipping on a tiny random LLaVA (CLIP + Llama), CPU float32."""

from __future__ import annotations

import threading

import pytest
import torch
from mmskip.vision import MoDConfig, MoDRouters
from transformers import LlamaForCausalLM

import mmskip
from mmskip import schedules
from mmskip.inject import SkipConfig
from mmskip.registry import get_adapter

from ._tiny import IMAGE_TOKEN, N_IMAGE, onevision_prompts, padded_prompts, tiny_llava, tiny_onevision


def _logits(model, batch, **kw):
    with torch.no_grad():
        return model(**batch, **kw).logits


def _hooked(model) -> bool:
    return any("_diffusers_hook" in m.__dict__ for m in model.modules())


def _expected_run(batch, ratio: float) -> int:
    """Positions per row that run a MoD layer: all non-vision tokens + trunc(n_vision * ratio)."""
    L = batch["input_ids"].shape[1]
    n = (batch["input_ids"] == IMAGE_TOKEN).sum(1).tolist()
    return max(L - v + int(v * ratio) for v in n)


def _random_routers(model, folder, seed=0, std=1.0):
    routers = MoDRouters.for_model(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in routers.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    routers.save(folder)
    return routers


# -- identity and removal ------------------------------------------------------------------------


def test_ratio_one_everywhere_is_identical(llava, batch):
    ref = _logits(llava, batch)
    ref_gen = llava.generate(**batch, max_new_tokens=3, do_sample=False)
    with mmskip.applied(llava, MoDConfig(schedule=schedules.explicit(ratios=[1.0] * 4))) as h:
        assert torch.equal(_logits(llava, batch), ref)
        assert torch.equal(llava.generate(**batch, max_new_tokens=3, do_sample=False), ref_gen)
        assert h.stats()["mod_layers"] == {}


def test_remove_restores_exact_outputs(llava, batch, tmp_path):
    ref = _logits(llava, batch)
    _random_routers(llava, tmp_path)
    for cfg in (MoDConfig(), MoDConfig(signal="norm"), MoDConfig(signal="router", routers=str(tmp_path))):
        h = mmskip.apply(llava, cfg)
        assert not torch.allclose(_logits(llava, batch), ref)  # it does change something
        h.remove()
        assert not _hooked(llava)
        assert torch.equal(_logits(llava, batch), ref)


# -- routing, packing and what runs --------------------------------------------------------------


@pytest.mark.parametrize("signal", ["attention", "norm", "router"])
def test_skipped_tokens_do_not_run(llava, batch, tmp_path, signal):
    """Each layer's MLP sees exactly the kept rows; stats and FLOP counts agree."""
    if signal == "router":
        _random_routers(llava, tmp_path)
    cfg = MoDConfig(signal=signal, routers=str(tmp_path) if signal == "router" else None)
    rows: dict[int, int] = {}
    layers = llava.model.language_model.layers
    hooks = [layers[i].mlp.register_forward_hook(lambda m, a, o, i=i: rows.__setitem__(i, a[0].shape[:-1].numel()))
             for i in range(4)]
    try:
        with mmskip.applied(llava, cfg) as h:
            _logits(llava, batch)
            stats = h.stats()
    finally:
        for hk in hooks:
            hk.remove()
    B, L = batch["input_ids"].shape
    ratios = schedules.progressive().ratios(4)
    assert stats["mod_layers"] == {i: r for i, r in enumerate(ratios) if r < 1}
    assert rows[0] == B * L
    for i, r in stats["mod_layers"].items():
        P = _expected_run(batch, r)
        assert rows[i] == B * P
        rec = stats["layers"][i]
        assert (rec["run"], rec["tokens"], rec["n_vision"]) == (B * P, B * L, B * N_IMAGE)
        assert rec["kept_vision"] == B * int(N_IMAGE * r)
        assert stats["items"][f"layer.{i}"] == {"executed": B * P, "skipped": B * (L - P)}
    assert 0.5 < stats["flops_fraction"] < 1.0 and 0.5 < stats["prefill_flops_fraction"] < 1.0
    assert 0 < stats["kv_bytes_saved"] < stats["kv_bytes_full"]


def _reference_check(model, handle, batch, layer_idx, signal, routers=None):
    """A MoD layer's packed run equals the plain layer on the full sequence with the skipped tokens
    masked out as keys (same rotary positions), on the kept rows; skipped vision rows pass (x w)."""
    layer = model.model.language_model.layers[layer_idx]
    seen = {}

    def pre(m, args, kwargs):
        seen["h"], seen["kw"] = args[0], kwargs

    def post(m, args, kwargs, out):
        seen["out"] = out

    hk = [layer.register_forward_pre_hook(pre, with_kwargs=True),
          layer.register_forward_hook(post, with_kwargs=True)]
    try:
        _logits(model, batch)
    finally:
        for x in hk:
            x.remove()
    h, kw, out = seen["h"], seen["kw"], seen["out"]
    B, L, _ = h.shape
    rec = handle.state.records[layer_idx]
    idx = rec.kept_idx
    kept = torch.zeros(B, L, dtype=torch.bool).scatter_(1, idx, True)
    vis = batch["input_ids"] == IMAGE_TOKEN
    pad = batch["attention_mask"].bool()
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    mask = causal[None] & pad[:, None, :] & kept[:, None, :]
    mask = (mask | torch.eye(L, dtype=torch.bool)[None])[:, None]
    w = torch.ones(B, L)
    if routers is not None:
        w = torch.where(vis, 0.2 * torch.tanh(routers.score(layer_idx, h)) + 1, w)
    scale = layer.mlp.register_forward_hook(lambda m, a, o: o * w[..., None])
    try:
        with torch.no_grad():  # outside the model's forward the hook runs the plain layer
            ref = layer(h, attention_mask=mask, position_embeddings=kw["position_embeddings"], cache=None)
    finally:
        scale.remove()
    check = kept & pad
    torch.testing.assert_close(out[check], ref[check], atol=1e-5, rtol=1e-5)
    skipped = vis & ~kept
    assert skipped.sum() == B * N_IMAGE - rec.kept_vision
    torch.testing.assert_close(out[skipped], (h * w[..., None])[skipped])
    if routers is None:
        assert torch.equal(out[skipped], h[skipped])


@pytest.mark.parametrize("signal", ["attention", "norm", "router"])
def test_packed_layer_matches_masked_reference(llava, batch, tmp_path, signal):
    routers = _random_routers(llava, tmp_path) if signal == "router" else None
    cfg = MoDConfig(signal=signal, routers=str(tmp_path) if routers is not None else None)
    with mmskip.applied(llava, cfg) as h:
        for i in h.state.ratios:
            _reference_check(llava, h, batch, i, signal, routers)


def test_attention_signal_is_fastv_last_token_attention(llava, batch):
    """The 'attention' ranking keeps the vision tokens the last prompt token attends to most (eager)."""
    model = tiny_llava(attn="eager")
    layer_idx = 1
    with torch.no_grad():
        out = model(**batch, output_attentions=True, output_hidden_states=True)
    att = out.attentions[layer_idx][:, :, -1, :].mean(1)  # (B, L): the last token's attention, mean over heads
    with mmskip.applied(model, MoDConfig()) as h:
        _logits(model, batch)
        rec = h.state.records[layer_idx]
        kept = [set(h.state.kept_vision_mask(layer_idx)[b].nonzero()[:, 0].tolist()) for b in range(3)]
    vis = batch["input_ids"] == IMAGE_TOKEN
    k = int(N_IMAGE * rec.ratio)
    for b in range(vis.shape[0]):
        top = att[b].masked_fill(~vis[b], -1).topk(k).indices
        assert set(top.tolist()) == kept[b]


# -- KV cache ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "signal,text_lens,attn",
    [("attention", (6, 3, 1), "sdpa"), ("norm", (6, 3, 1), "sdpa"), ("router", (5, 2), "sdpa"),
     ("attention", (4, 4), "sdpa"), ("attention", (6, 1), "eager")],
)
def test_cached_generation_equals_recompute(tmp_path, signal, text_lens, attn):
    """Greedy generation with the per-layer trimmed KV cache equals a no-cache recompute of every
    step under the same (pinned) routing; left-padded and unpadded batches, sdpa and eager."""
    model = tiny_llava(attn=attn)
    batch = padded_prompts(text_lens)
    if signal == "router":
        _random_routers(model, tmp_path)
    cfg = MoDConfig(signal=signal, routers=str(tmp_path) if signal == "router" else None)
    steps = 4
    with mmskip.applied(model, cfg) as h:
        with torch.no_grad():
            gen = model.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        B, L = batch["input_ids"].shape
        cache = gen.past_key_values
        for i in range(4):
            P = L if i not in h.state.ratios else _expected_run(batch, h.state.ratios[i])
            assert cache.layers[i].keys.shape[-2] == P + steps - 1  # a layer caches only what it ran
        stats = h.stats()
        h.state.pin_routing()
        for t in range(steps):
            ids = gen.sequences[:, : L + t]
            mask = torch.cat([batch["attention_mask"], torch.ones(B, t, dtype=torch.long)], 1)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                full = model(input_ids=ids, attention_mask=mask, position_ids=pos,
                             pixel_values=batch["pixel_values"], use_cache=False).logits[:, -1]
            torch.testing.assert_close(full, gen.logits[t], atol=2e-5, rtol=1e-5)
            assert torch.equal(full.argmax(-1), gen.sequences[:, L + t])
    kv = stats["kv_bytes_full"] - stats["kv_bytes_saved"]
    per_token = 2 * 32 * 4  # K and V, 2 kv heads x 16 dims, float32
    assert kv == sum(cache.layers[i].keys.shape[-2] - steps + 1 for i in range(4)) * B * per_token


def test_onevision_qwen2_cached_generation_equals_recompute():
    """LLaVA-OneVision (Qwen2 text): same KV rule, left-padded batch."""
    model, batch = tiny_onevision(), onevision_prompts()
    ref = _logits(model, batch)
    steps = 3
    with mmskip.applied(model, MoDConfig()) as h:
        with torch.no_grad():
            gen = model.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        assert h.stats()["layers"][3]["kept_vision"] == 2 * int(36 * 0.15)
        h.state.pin_routing()
        B, L = batch["input_ids"].shape
        for t in range(steps):
            mask = torch.cat([batch["attention_mask"], torch.ones(B, t, dtype=torch.long)], 1)
            b = {**batch, "input_ids": gen.sequences[:, : L + t], "attention_mask": mask,
                 "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
            torch.testing.assert_close(_logits(model, b, use_cache=False)[:, -1], gen.logits[t], atol=2e-5, rtol=1e-5)
    assert torch.equal(_logits(model, batch), ref)


def test_bfloat16_generation_runs_and_removes_exactly(batch):
    model = tiny_llava().to(torch.bfloat16)
    ref = _logits(model, batch)
    with mmskip.applied(model, MoDConfig(signal="norm")) as h:
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
        assert out.shape[1] == batch["input_ids"].shape[1] + 3
        assert h.stats()["kv_fraction"] < 1
    assert torch.equal(_logits(model, batch), ref)


def test_multi_token_continuation_matches_recompute(llava, batch):
    """A text chunk of several tokens appended to the trimmed cache (left-padded batch: a materialised
    mask sliced per MoD layer) equals a pinned no-cache recompute."""
    extra = torch.randint(3, 120, (3, 3), generator=torch.Generator().manual_seed(5))
    B, L = batch["input_ids"].shape
    mask = torch.cat([batch["attention_mask"], torch.ones(B, 3, dtype=torch.long)], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with mmskip.applied(llava, MoDConfig(signal="norm")) as h:
        with torch.no_grad():
            out = llava(**batch, position_ids=pos[:, :L], use_cache=True)
            step = llava(input_ids=extra, attention_mask=mask, position_ids=pos[:, L:], cache=out.past_key_values).logits
            h.state.pin_routing()
            full = llava(input_ids=torch.cat([batch["input_ids"], extra], 1), attention_mask=mask, position_ids=pos,
                         pixel_values=batch["pixel_values"], use_cache=False).logits
    torch.testing.assert_close(step, full[:, L:], atol=2e-5, rtol=1e-5)


def test_decode_after_reset_or_foreign_cache_is_refused(llava, batch):
    with mmskip.applied(llava, MoDConfig()) as h:
        with torch.no_grad():
            out = llava(**batch, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(nxt)], 1)
        h.state.reset()
        with pytest.raises(RuntimeError, match="KV cache holds"), torch.no_grad():
            llava(input_ids=nxt, attention_mask=mask, cache=out.past_key_values)


# -- bad input -----------------------------------------------------------------------------------


def test_text_only_batch_runs_the_plain_model(llava, caplog):
    ids = torch.randint(3, 120, (2, 9), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    ref = _logits(llava, batch)
    ref_gen = llava.generate(**batch, max_new_tokens=3, do_sample=False)
    with caplog.at_level("WARNING", logger="mmskip.vision.pmod"), mmskip.applied(llava, MoDConfig()) as h:
        assert torch.equal(_logits(llava, batch), ref)
        assert torch.equal(llava.generate(**batch, max_new_tokens=3, do_sample=False), ref_gen)
        assert h.stats()["mode"] == "plain"
        assert h.stats()["skipped"] == 0
    assert [r.message for r in caplog.records].count(
        "mmskip pmod: a prompt with no vision tokens: the plain model runs (nothing to skip); "
        "stats()['mode'] == 'plain' (expected for a VideoStream's text prefix)") == 1  # told once, not per call


def test_mixed_batch_keeps_rows_aligned(llava, batch):
    """A row without an image forces every row to keep all tokens (equal packed lengths): the
    result is the plain model's, never a wrong one."""
    b = padded_prompts((3, 1))
    b["input_ids"][1, b["input_ids"][1] == IMAGE_TOKEN] = 5  # row 1 has no image
    b["pixel_values"] = b["pixel_values"][:1]
    ref = _logits(llava, b)
    with mmskip.applied(llava, MoDConfig()) as h:
        assert torch.equal(_logits(llava, b), ref)
        assert h.stats()["skipped"] == 0


def _refused(model, batch, cfg, exc, match):
    ref = _logits(model, batch)
    with pytest.raises(exc, match=match):
        mmskip.apply(model, cfg() if callable(cfg) else cfg)
    assert not _hooked(model)
    assert torch.equal(_logits(model, batch), ref)


def test_schedule_deeper_than_decoder(llava, batch):
    _refused(llava, batch, MoDConfig(schedule=schedules.progressive(num=8)), ValueError, "4-layer")
    _refused(llava, batch, MoDConfig(schedule=schedules.explicit(ratios=[1, 0.5, 0.5, 0.5, 0.5])), ValueError,
             "does not fit")


def test_keep_ratio_outside_unit_interval():
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        MoDConfig(schedule=schedules.explicit(ratios=[1.0, 0.5, 0.0, 0.5]))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        MoDConfig(schedule=schedules.progressive(floor=0.0, num=4))
    with pytest.raises(ValueError):
        MoDConfig(schedule=schedules.explicit(ratios=[1.0, 1.5]))
    with pytest.raises(ValueError, match="layer 0"):
        MoDConfig(schedule=schedules.explicit(ratios=[0.5, 1.0, 1.0, 1.0]))


def test_ratio_zero_refused_at_apply(llava, batch):
    _refused(llava, batch, MoDConfig(schedule=schedules.progressive(floor=0.0)), ValueError, r"\(0, 1\]")


def test_routers_of_another_model(llava, batch, tmp_path):
    other = tiny_llava(hidden=32)
    MoDRouters.for_model(other).save(tmp_path / "other")
    cfg = MoDConfig(signal="router", routers=str(tmp_path / "other"))
    _refused(llava, batch, cfg, ValueError, "another model.*hidden_size")
    MoDRouters.for_model(llava, layers=[1, 2]).save(tmp_path / "partial")
    _refused(llava, batch, MoDConfig(signal="router", routers=str(tmp_path / "partial")), ValueError, r"\[3\]")
    _refused(llava, batch, MoDConfig(signal="router", routers=str(tmp_path / "none")), FileNotFoundError,
             "no p-MoD routers")


def test_unsupported_model_class():
    lm = LlamaForCausalLM(tiny_llava().config.text_config).eval()
    with pytest.raises(mmskip.UnsupportedModelError, match="LlamaForCausalLM.*LlavaForConditionalGeneration"):
        mmskip.apply(lm, MoDConfig())
    assert not _hooked(lm)


def test_config_errors():
    with pytest.raises(ValueError, match="signal"):
        MoDConfig(signal="fastv")
    with pytest.raises(ValueError, match="routers="):
        MoDConfig(signal="router")
    with pytest.raises(ValueError, match="only used with signal='router'"):
        MoDConfig(routers="x")
    with pytest.raises(ValueError, match="static schedule"):
        MoDConfig(schedule=schedules.adaptive(0.5))
    with pytest.raises(ValueError, match="tanh_scale"):
        MoDConfig(tanh_scale=1.0)


def test_images_in_a_later_forward_are_a_routed_chunk(llava, batch):
    """A forward that brings images to an existing cache is routed like a prefill; each MoD
    layer's cache grows by the tokens it ran, the others by the whole chunk."""
    with mmskip.applied(llava, MoDConfig()) as h:
        with torch.no_grad():
            out = llava(**batch, use_cache=True)
            cache = out.past_key_values
            before = [layer.get_seq_length() for layer in cache.layers]
            B, L = batch["input_ids"].shape
            mask = torch.cat([batch["attention_mask"], torch.ones(B, L, dtype=torch.long)], 1)
            llava(input_ids=batch["input_ids"].clamp(min=3), pixel_values=batch["pixel_values"], attention_mask=mask,
                  cache=cache, use_cache=True)
        grown = [layer.get_seq_length() - n for layer, n in zip(cache.layers, before)]
        n_vis = int(batch["input_ids"].clamp(min=3).eq(IMAGE_TOKEN).sum(1)[0])
        for i in range(4):
            ratio = h.state.ratios.get(i, 1.0)
            assert grown[i] == L - n_vis + int(n_vis * ratio)
        assert h.state.records[3].tokens == 2 * B * L  # both chunks counted


# -- config, state, concurrency ------------------------------------------------------------------


def test_config_round_trip(tmp_path):
    cfg = MoDConfig(schedule=schedules.explicit(ratios=[1.0, 0.5, 0.5, 0.25]), signal="norm")
    assert SkipConfig.from_dict(cfg.to_json()) == cfg
    cfg.save_pretrained(tmp_path)
    assert SkipConfig.from_pretrained(tmp_path) == cfg


def test_adapter_and_state_reset(llava, batch):
    adapter = get_adapter(llava, "vlm")
    assert adapter.num_layers == 4 and adapter.head is llava.lm_head and adapter.vision_token_ids == (IMAGE_TOKEN,)
    with mmskip.applied(llava.model, MoDConfig()) as h:  # the headless LlavaModel works too
        with torch.no_grad():
            llava.model(**batch)
        assert h.stats()["mode"] == "mod" and h.stats()["kv_fraction"] < 1
        h.state.reset()
        s = h.stats()
        assert s["mode"] == "none" and s["layers"][1]["run"] == 0 and s["executed"] > 0  # counts stay


def test_inputs_embeds_path(llava, batch):
    """Vision positions are found from placeholder embeddings when no input_ids are given."""
    with mmskip.applied(llava, MoDConfig()) as h:
        ref = _logits(llava, batch)
        embeds = llava.get_input_embeddings()(batch["input_ids"])
        b = {"inputs_embeds": embeds, "attention_mask": batch["attention_mask"], "pixel_values": batch["pixel_values"]}
        torch.testing.assert_close(_logits(llava, b), ref)
        assert h.stats()["mode"] == "mod"


def test_concurrent_use_is_refused(llava, batch):
    inside, release = threading.Event(), threading.Event()
    layer = llava.model.language_model.layers[2]

    def block(m, a, o):
        if threading.current_thread().name == "first":
            inside.set()
            release.wait(10)

    hk = layer.mlp.register_forward_hook(block)
    errors = []
    try:
        with mmskip.applied(llava, MoDConfig()):
            t = threading.Thread(target=lambda: _logits(llava, batch), name="first")
            t.start()
            assert inside.wait(10)
            try:
                _logits(llava, batch)
            except mmskip.ConcurrentUseError as err:
                errors.append(err)
            finally:
                release.set()
                t.join(10)
            _logits(llava, batch)  # usable again afterwards
    finally:
        hk.remove()
    assert len(errors) == 1
