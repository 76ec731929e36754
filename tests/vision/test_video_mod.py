"""VideoLLM-MoD (frame-wise vision-token routing) and the video stream, on tiny random
LLaVA-OneVision (SigLIP + Qwen2) and Qwen2-VL (3-D M-RoPE) models, CPU float32."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from mmskip.vision import MoDConfig, VideoMoDConfig, VideoStream

import mmskip
from mmskip import schedules
from mmskip.inject import SkipConfig
from mmskip.registry import get_adapter

from .._ops import op_counts
from ._tiny import (
    ONEVISION_FRAME,
    QWEN_VIDEO,
    VIDEO_TOKEN,
    onevision_video_prompts,
    qwen_clip,
    qwen_video_prompt,
    tiny_llava,
    tiny_onevision,
    tiny_qwen2vl,
)


def _logits(model, batch, **kw):
    with torch.no_grad():
        return model(**batch, **kw).logits


def _hooked(model) -> bool:
    return any("_diffusers_hook" in m.__dict__ for m in model.modules())


def _frames(model, batch) -> torch.Tensor:
    adapter = get_adapter(model, "vlm")
    video = adapter.vision_mask(batch["input_ids"], None, video_only=True)
    return adapter.frame_groups(batch, video)


@pytest.fixture(scope="module")
def onevision():
    return tiny_onevision()


# -- one pass ------------------------------------------------------------------------------------


def test_image_only_model_refused():
    model = tiny_llava()
    with pytest.raises(ValueError, match="takes images only"):
        mmskip.apply(model, VideoMoDConfig())
    assert not _hooked(model)
    with pytest.raises(ValueError, match="takes images only"):
        VideoStream(model)


def test_frame_groups_follow_the_processor_layout(onevision):
    batch = onevision_video_prompts((1, 2), frames=3)
    groups = _frames(onevision, batch)
    for row, n_videos in enumerate((1, 2)):
        g = groups[row]
        ids = g[g >= 0]
        assert ids.unique().numel() == 3 * n_videos  # one group per frame
        assert torch.equal(torch.bincount(ids - ids.min()), torch.full((3 * n_videos,), ONEVISION_FRAME))
        # each video's trailing newline is video-token but in no frame: it always runs
        assert int(((batch["input_ids"][row] == VIDEO_TOKEN) & (g < 0)).sum()) == n_videos


@pytest.mark.parametrize("build", ["onevision", "qwen"])
def test_ratio_one_is_identical_and_remove_restores(build, onevision):
    if build == "onevision":
        model, batch = onevision, onevision_video_prompts()
    else:
        model, batch = tiny_qwen2vl(), qwen_video_prompt([qwen_clip()])
    ref = _logits(model, batch)
    with mmskip.applied(model, VideoMoDConfig(schedule=schedules.constant(1.0))):
        assert torch.equal(_logits(model, batch), ref)
    with mmskip.applied(model, VideoMoDConfig(schedule=schedules.constant(0.5))):
        assert not torch.equal(_logits(model, batch), ref)
    assert torch.equal(_logits(model, batch), ref)
    assert not _hooked(model)


def test_ratio_one_groups_no_frames(onevision, monkeypatch):
    """No MoD layer: no frame groups built, only the video-token mask on top of the plain ops."""
    batch = onevision_video_prompts((1, 2), frames=3)
    adapter = get_adapter(onevision, "vlm")

    def never(*a, **k):
        raise AssertionError("frame groups built with no MoD layer")

    ref, plain = op_counts(lambda: _logits(onevision, batch))
    with mmskip.applied(onevision, VideoMoDConfig(schedule=schedules.constant(1.0))) as h:
        monkeypatch.setattr(type(h.state.adapter), "frame_groups", never)
        out, zero = op_counts(lambda: _logits(onevision, batch))
        s = h.stats()
    assert torch.equal(out, ref) and adapter.num_layers == len(s["items"])
    assert plain - zero == Counter()
    assert set(zero - plain) <= {"zeros_like", "eq", "bitwise_or_", "any", "_local_scalar_dense"}
    assert s["mode"] == "mod" and s["skipped"] == 0 and s["prefill_flops_fraction"] == 1.0


@pytest.mark.parametrize("signal", ["attention", "norm"])
@pytest.mark.parametrize("videos", [(2, 2), (1, 2)])
def test_each_frame_keeps_its_quota(onevision, signal, videos):
    """Every frame runs its top trunc(n_frame * R) tokens; in a batch whose rows hold different
    numbers of frames, rows that would keep fewer tokens than the packed width (those with more
    frames) fill up with their best other frame tokens."""
    batch = onevision_video_prompts(videos, frames=3)
    groups = _frames(onevision, batch)
    quota = int(ONEVISION_FRAME * 0.5)
    with mmskip.applied(onevision, VideoMoDConfig(schedule=schedules.constant(0.5), signal=signal)) as h:
        _logits(onevision, batch)
        assert sorted(h.state.ratios) == [1, 2, 3]
        for layer in h.state.ratios:
            kept = h.state.kept_vision_mask(layer)
            for row, n_videos in enumerate(videos):
                g = groups[row]
                per_frame = [int(kept[row][g == f].sum()) for f in g[g >= 0].unique()]
                if n_videos == min(videos):
                    assert per_frame == [quota] * len(per_frame)
                else:  # packed width: what the row with fewest frames keeps
                    assert min(per_frame) >= quota
                    skipped = 3 * min(videos) * (ONEVISION_FRAME - quota)
                    assert sum(per_frame) == 3 * n_videos * ONEVISION_FRAME - skipped
        stats = h.stats()
    assert stats["layers"][2]["n_vision"] == 3 * sum(videos) * ONEVISION_FRAME


def test_qwen2vl_packed_layers_match_masked_reference():
    """Qwen2-VL with 3-D M-RoPE: every MoD layer run on its packed kept tokens equals the plain
    model whose MoD layers see the skipped tokens masked out as keys and pass them through
    unchanged (eager attention, full positions): gathered cos/sin keep each token's position."""
    model = tiny_qwen2vl(attn="eager")
    batch = qwen_video_prompt([qwen_clip(seed=4), qwen_clip(t=2, seed=5)])
    with mmskip.applied(model, VideoMoDConfig(schedule=schedules.constant(0.5), signal="norm")) as h:
        out = _logits(model, batch)
        kept = {i: h.state.kept_vision_mask(i)[0] for i in h.state.ratios}
        routed = h.state.vision[0].clone()
    assert routed.sum() == 3 * 8 + 2 * 8  # t x (h*w/4) tokens, every frame routed
    layers = model.model.language_model.layers
    hooks = []
    for i, keep in kept.items():
        skipped = routed & ~keep

        def pre(m, args, kwargs, skipped=skipped):
            mask = kwargs["attention_mask"].clone()
            L = mask.shape[-1]
            block = skipped[None, None, None, :] & ~torch.eye(L, dtype=torch.bool)[None, None]
            kwargs["attention_mask"] = mask.masked_fill(block, torch.finfo(mask.dtype).min)
            return args, kwargs

        def post(m, args, kwargs, output, skipped=skipped):
            h_in = args[0] if args else kwargs["hidden_states"]
            return torch.where(skipped[None, :, None], h_in, output)

        hooks += [layers[i].register_forward_pre_hook(pre, with_kwargs=True),
                  layers[i].register_forward_hook(post, with_kwargs=True)]
    try:
        ref = _logits(model, batch)
    finally:
        for x in hooks:
            x.remove()
    text = ~routed
    torch.testing.assert_close(out[0][text], ref[0][text], atol=1e-4, rtol=1e-4)


def test_cached_generation_equals_recompute(onevision):
    """Left-padded batch with one and two videos per row: greedy generation through the per-layer
    trimmed KV cache equals a no-cache recompute under the same (pinned) routing."""
    batch = onevision_video_prompts((1, 2), frames=3, text_lens=(5, 1))
    steps = 3
    with mmskip.applied(onevision, VideoMoDConfig(schedule=schedules.constant(0.5))) as h:
        with torch.no_grad():
            gen = onevision.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True)
        h.state.pin_routing()
        B, L = batch["input_ids"].shape
        for t in range(steps):
            mask = torch.cat([batch["attention_mask"], torch.ones(B, t, dtype=torch.long)], 1)
            b = {**batch, "input_ids": gen.sequences[:, : L + t], "attention_mask": mask,
                 "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
            torch.testing.assert_close(_logits(onevision, b, use_cache=False)[:, -1], gen.logits[t],
                                       atol=2e-5, rtol=1e-5)


def test_config_round_trip_and_errors(tmp_path):
    cfg = VideoMoDConfig(schedule=schedules.constant(0.3, first=2), signal="norm")
    assert SkipConfig.from_dict(cfg.to_json()) == cfg
    cfg.save_pretrained(tmp_path)
    assert SkipConfig.from_pretrained(tmp_path) == cfg
    with pytest.raises(ValueError, match="VideoMoDConfig.signal"):
        VideoMoDConfig(signal="magic")
    with pytest.raises(ValueError, match="layer 0 must keep"):
        mmskip.apply(tiny_onevision(), VideoMoDConfig(schedule=schedules.constant(0.2, first=0)))
    with pytest.raises(ValueError, match="ratio must lie"):
        schedules.constant(1.5)


def test_video_tokens_without_frames_refused(onevision):
    batch = onevision_video_prompts((1, 1))
    embeds = onevision.get_input_embeddings()(batch["input_ids"])
    with mmskip.applied(onevision, VideoMoDConfig()):
        with pytest.raises(ValueError, match="no video frames"):
            onevision(inputs_embeds=embeds, attention_mask=batch["attention_mask"])


# -- streaming -----------------------------------------------------------------------------------


def _onevision_stream_inputs(clips: int = 3, frames: int = 2, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    pixels = [torch.randn(frames, 3, 16, 16, generator=g) for _ in range(clips)]
    per_clip = frames * ONEVISION_FRAME + 1
    ids = [5, 6] + [VIDEO_TOKEN] * (per_clip * clips) + [7, 8, 9]
    whole = {"input_ids": torch.tensor([ids]), "pixel_values_videos": torch.stack(pixels)}
    return pixels, whole


def test_stream_of_clips_equals_one_pass(onevision):
    pixels, whole = _onevision_stream_inputs()
    ref = _logits(onevision, whole)[:, -1]
    stream = VideoStream(onevision, prefix=torch.tensor([5, 6]))
    for clip in pixels:
        stream.add_clip(clip)
    assert stream.frames == 6 and stream.clips == 3
    before = [layer.get_seq_length() for layer in stream.cache.layers]
    answer = stream.ask(torch.tensor([7, 8, 9]), max_new_tokens=2)
    assert answer.shape == (1, 2) and int(answer[0, 0]) == int(ref.argmax(-1))
    assert [layer.get_seq_length() for layer in stream.cache.layers] == before  # rolled back
    torch.testing.assert_close(stream.feed(torch.tensor([7, 8, 9])), ref, atol=1e-5, rtol=1e-5)


def test_qwen2vl_stream_equals_one_pass():
    """Each clip's M-RoPE positions come from get_rope_index on the clip, shifted after the
    stream so far: the same positions (and logits) as the whole prompt in one pass."""
    model = tiny_qwen2vl()
    clips = [qwen_clip(seed=4), qwen_clip(t=2, seed=5), qwen_clip(seed=6)]
    ref = _logits(model, qwen_video_prompt(clips))[:, -1]
    stream = VideoStream(model, prefix=torch.tensor([5, 6]))
    for c in clips:
        stream.add_clip(**c)
    torch.testing.assert_close(stream.feed(torch.tensor([7, 8])), ref, atol=1e-5, rtol=1e-5)


def test_stream_with_videomod_routes_each_clip(onevision):
    """Under VideoLLM-MoD each clip is routed as it arrives: a MoD layer's cache grows by the
    tokens it ran, and the stream equals one pass that replays the same routing."""
    pixels, whole = _onevision_stream_inputs()
    frames, per_clip = 2, 2 * ONEVISION_FRAME + 1
    plain = VideoStream(onevision, prefix=torch.tensor([5, 6]))
    for clip in pixels:
        plain.add_clip(clip)
    with mmskip.applied(onevision, VideoMoDConfig(schedule=schedules.constant(0.5))) as h:
        stream = VideoStream(onevision, prefix=torch.tensor([5, 6]))
        for clip in pixels:
            stream.add_clip(clip)
        lengths = [layer.get_seq_length() for layer in stream.cache.layers]
        kept_per_clip = per_clip - frames * (ONEVISION_FRAME - int(ONEVISION_FRAME * 0.5))
        assert lengths[0] == 2 + 3 * per_clip
        assert lengths[1:] == [2 + 3 * kept_per_clip] * 3
        assert stream.kv_bytes() < plain.kv_bytes()
        out = stream.feed(torch.tensor([7, 8, 9]))
        # replay: each layer's kept set over the whole prompt, from its cache positions
        L = whole["input_ids"].shape[1]
        routed = _frames(onevision, whole)[0] >= 0
        pinned = {}
        for i, rec in h.state.records.items():
            held = torch.zeros(L, dtype=torch.bool)
            held[rec.cols[0]] = True
            held[rec.tail_from:] = True
            pinned[i] = (held & routed)[None]
        h.state.pinned = pinned
        ref = _logits(onevision, whole)[:, -1]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not _hooked(onevision)


def test_stream_refuses_batches(onevision):
    stream = VideoStream(onevision)
    with pytest.raises(ValueError, match="batch 1"):
        stream.feed(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="max_new_tokens"):
        stream.ask(torch.tensor([5]), max_new_tokens=0)


@pytest.mark.parametrize("shape", [(0, 3, 16, 16), (1, 0, 3, 16, 16)])
def test_stream_refuses_an_empty_clip(onevision, shape):
    stream = VideoStream(onevision, prefix=torch.tensor([5, 6]))
    before = [layer.get_seq_length() for layer in stream.cache.layers]
    with pytest.raises(ValueError, match="empty clip.*at least one frame"):
        stream.add_clip(torch.zeros(shape))
    assert stream.frames == 0 and stream.clips == 0
    assert [layer.get_seq_length() for layer in stream.cache.layers] == before


def test_qwen2vl_stream_refuses_an_empty_clip():
    stream = VideoStream(tiny_qwen2vl(), prefix=torch.tensor([5, 6]))
    clip = qwen_clip(seed=4)
    with pytest.raises(ValueError, match="empty clip"):
        stream.add_clip(clip["pixel_values_videos"][:0], video_grid_thw=torch.tensor([[0, 4, 8]]))


def test_pmod_on_video_model_routes_all_vision_tokens(onevision):
    """MoDConfig (p-MoD) on a video prompt ranks all of a row's video tokens together."""
    batch = onevision_video_prompts((2, 2), frames=3, text_lens=(3, 3))
    with mmskip.applied(onevision, MoDConfig(schedule=schedules.constant(0.5))) as h:
        _logits(onevision, batch)
        n = int((batch["input_ids"][0] == VIDEO_TOKEN).sum())
        assert h.stats()["layers"][1]["kept_vision"] == 2 * int(n * 0.5)
    assert QWEN_VIDEO != VIDEO_TOKEN
