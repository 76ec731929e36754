"""MuE: configs and schedules refused or round-tripped, unsupported models, adapters, concurrency."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
from mmskip.vision.adapters import EncDecVLMAdapter
from mmskip.vision.mue import MuEConfig
from transformers import LlamaConfig, LlamaForCausalLM

import mmskip
from mmskip import schedules
from mmskip.inject import SkipConfig
from mmskip.registry import get_adapter

from ._mue_common import EXITS, NEVER, STEPS, _generate, _hooked, _logits, _rows_run  # noqa: F401
from ._tiny_florence import IMAGE_TOKEN, N_IMAGE, florence_prompts, row, tiny_florence


@pytest.fixture(scope="module")
def florence():
    return tiny_florence()


@pytest.fixture
def batch():
    return florence_prompts()


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"image_threshold": 1.5}, ValueError, r"\[0, 1\]"),
    ({"text_threshold": -0.1}, ValueError, r"\[0, 1\]"),
    ({"decoder_threshold": float("nan")}, ValueError, r"\[0, 1\]"),
    ({"floor": 2.0}, ValueError, r"\[0, 1\]"),
    ({"decoder_threshold": 0.8, "floor": 0.9}, ValueError, "floor"),
    ({"decay": 0.0}, ValueError, "decay"),
    ({"decay": 1.5}, ValueError, "decay"),
    ({"min_layers": 0}, ValueError, "min_layers"),
    ({"encoder_granularity": "layer"}, ValueError, "granularity"),
    ({"image_threshold": "high"}, TypeError, "image_threshold"),
    ({"min_layers": 1.5}, TypeError, "min_layers"),
])
def test_bad_config_fields(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        MuEConfig(**kwargs)


def _refused(model, batch, cfg, exc, match):
    ref = _logits(model, batch)
    with pytest.raises(exc, match=match):
        mmskip.apply(model, cfg)
    assert not _hooked(model) and "get_placeholder_mask" not in model.model.__dict__
    assert torch.equal(_logits(model, batch), ref)


def test_min_layers_deeper_than_the_decoder(florence, batch):
    _refused(florence, batch, MuEConfig(min_layers=4), ValueError, "4 layers")


def test_decoder_only_model_is_unsupported():
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, vocab_size=64)).eval()
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        ref = lm(ids).logits
    with pytest.raises(mmskip.UnsupportedModelError, match="LlamaForCausalLM.*Florence2ForConditionalGeneration"):
        mmskip.apply(lm, MuEConfig())
    assert not _hooked(lm)
    with torch.no_grad():
        assert torch.equal(lm(ids).logits, ref)


def test_pins_and_reset(florence, batch):
    with mmskip.applied(florence, EXITS) as h:
        with pytest.raises(RuntimeError, match="nothing recorded"):
            h.state.pin_exits()
        _generate(florence, batch)
        h.state.pin_exits()
        with pytest.raises(ValueError, match="pinned encoder exits"):
            _logits(florence, row(batch, 2))  # another shape
        h.state.pinned_encoder = None
        with pytest.raises(ValueError, match="pinned decoder exits"):
            _logits(florence, batch, dec=torch.full((3, STEPS + 3), 2))  # beyond the recorded positions
        h.state.reset()
        s = h.stats()
        assert not s["pinned"] and s["decoder"]["tokens"] == 0 and s["encoder"]["image"]["tokens"] == 0
        assert s["executed"] > 0  # the FLOPs counts stay until reset_stats()
        h.reset_stats()
        assert h.stats()["executed"] == 0


# -- config, adapter, concurrency ----------------------------------------------------------------


def test_config_round_trip(tmp_path):
    for cfg in (EXITS, NEVER[1], MuEConfig(encoder_granularity="modality", min_layers=2, decay=1)):
        assert SkipConfig.from_dict(cfg.to_json()) == cfg
    EXITS.save_pretrained(tmp_path)
    assert SkipConfig.from_pretrained(tmp_path) == EXITS
    assert MuEConfig.technique == "mue" and "2211.11152" in MuEConfig.__doc__


def test_adapter_and_headless_model(florence, batch):
    adapter = get_adapter(florence, "encdec-vlm")
    assert isinstance(adapter, EncDecVLMAdapter)
    lm = florence.model.language_model
    assert adapter.encoder is lm.encoder and adapter.decoder is lm.decoder and adapter.head is florence.lm_head
    assert adapter.mm_model is florence.model and adapter.image_token_id == IMAGE_TOKEN
    assert (adapter.num_encoder_layers, adapter.num_decoder_layers) == (4, 4)
    assert type(lm.encoder.layers[0]).__name__ == "BartEncoderLayer"
    ref = florence.model(**batch, decoder_input_ids=torch.full((3, 2), 2)).last_hidden_state.detach()
    with mmskip.applied(florence.model, EXITS) as h:  # Florence2Model without the LM head
        with torch.no_grad():
            out = florence.model(**batch, decoder_input_ids=torch.full((3, 2), 2)).last_hidden_state
        assert out.shape == ref.shape and h.stats()["encoder"]["image"]["tokens"] == 3 * N_IMAGE
    with torch.no_grad():
        assert torch.equal(florence.model(**batch, decoder_input_ids=torch.full((3, 2), 2)).last_hidden_state, ref)


def test_inputs_embeds_path(florence, batch):
    """Without input_ids the image tokens are found from their placeholder embeddings."""
    with mmskip.applied(florence, EXITS) as h:
        ref = _logits(florence, batch)
        embeds = florence.get_input_embeddings()(batch["input_ids"])
        b = {"inputs_embeds": embeds, "attention_mask": batch["attention_mask"], "pixel_values": batch["pixel_values"]}
        torch.testing.assert_close(_logits(florence, b), ref)
        assert h.stats()["encoder"]["image"]["tokens"] == 3 * N_IMAGE


def test_concurrent_use_is_refused(florence, batch):
    inside, release = threading.Event(), threading.Event()
    layer = florence.model.language_model.encoder.layers[0]  # runs every token

    def block(m, a, o):
        if threading.current_thread().name == "first":
            inside.set()
            release.wait(10)

    hk = layer.fc1.register_forward_hook(block)
    errors = []
    try:
        with mmskip.applied(florence, EXITS):
            t = threading.Thread(target=lambda: _logits(florence, batch), name="first")
            t.start()
            assert inside.wait(10)
            try:
                _logits(florence, batch)
            except mmskip.ConcurrentUseError as err:
                errors.append(err)
            finally:
                release.set()
                t.join(10)
            _logits(florence, batch)  # usable again afterwards
    finally:
        hk.remove()
    assert len(errors) == 1


# -- thresholds from the shared scheduler ---------------------------------------------------------

# EXITS with every threshold from a schedule (min_layers None = ceil(4 / 3) = 2 on the tiny model)
SCHEDULED = MuEConfig(image_schedule=schedules.adaptive(0.965), text_schedule=schedules.adaptive(0.95),
                      decoder_schedule=schedules.decaying(0.94, decay=0.99, floor=0.85, warmup=2))


@pytest.mark.parametrize("granularity", ["token", "modality"])
def test_scheduled_config_equals_the_float_config(florence, batch, granularity):
    # a whole modality block is less similar than its most similar tokens: lower encoder thresholds
    img, txt = (0.96, 0.94) if granularity == "modality" else (EXITS.image_threshold, EXITS.text_threshold)
    floats = MuEConfig(image_threshold=img, text_threshold=txt, encoder_granularity=granularity,
                       decoder_threshold=EXITS.decoder_threshold, decay=EXITS.decay, floor=EXITS.floor, min_layers=2)
    sched = dataclasses.replace(SCHEDULED, encoder_granularity=granularity, image_schedule=schedules.adaptive(img),
                                text_schedule=schedules.adaptive(txt))
    runs = []
    for cfg in (floats, sched):
        with mmskip.applied(florence, cfg) as h:
            runs.append((_logits(florence, batch), _generate(florence, batch), h.state.encoder_record.exit_layer,
                         h.state.decoder_exits, h.stats()))
    (lf, gf, ef, df, sf), (ls, gs, es, ds, ss) = runs
    assert torch.equal(lf, ls) and torch.equal(gf, gs) and torch.equal(ef, es) and torch.equal(df, ds)
    assert sf["encoder"] == ss["encoder"] and sf["decoder"] == ss["decoder"]
    assert sf["flops_fraction"] == ss["flops_fraction"] < 1.0
    assert ss["decoder"]["min_layers"] == 2 and ss["decoder"]["threshold"] == 0.94
    assert [sched.decoder_threshold_at(t) for t in range(4)] == [floats.decoder_threshold_at(t) for t in range(4)]


def test_scheduled_warmup_is_min_layers():
    """warmup=0 and warmup=1 both let a token exit after the first decoder layer (min_layers=1)."""
    model = tiny_florence()
    b = row(florence_prompts(), 0)
    outs = []
    for cfg in (MuEConfig(image_threshold=None, text_threshold=None, decoder_threshold=1.0, decay=1e-9, floor=0.0,
                          min_layers=1),
                MuEConfig(image_threshold=None, text_threshold=None,
                          decoder_schedule=schedules.decaying(1.0, decay=1e-9, floor=0.0, warmup=0))):
        with mmskip.applied(model, cfg) as h:
            outs.append((_generate(model, b), h.state.decoder_exits.tolist(), h.stats()["decoder"]["min_layers"]))
    assert outs[0][1] == outs[1][1] == [[4] + [1] * (STEPS - 1)]
    assert torch.equal(outs[0][0], outs[1][0]) and outs[1][2] == 1


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"decoder_schedule": schedules.decaying(0.9), "decoder_threshold": 0.8}, ValueError,
     "decoder_schedule supplies.*decoder_threshold=0.8"),
    ({"decoder_schedule": schedules.decaying(0.9), "min_layers": 2}, ValueError, "min_layers=2"),
    ({"decoder_schedule": schedules.decaying(0.9), "decay": 1.0}, ValueError, "decay=1.0"),
    ({"image_schedule": schedules.adaptive(0.9), "image_threshold": None}, ValueError, "image_schedule supplies"),
    ({"text_schedule": schedules.adaptive(0.9), "text_threshold": 0.5}, ValueError, "text_schedule supplies"),
    ({"image_schedule": schedules.adaptive(0.9, signal="router")}, ValueError, "signal='cosine'"),
    ({"text_schedule": schedules.adaptive(1.5)}, ValueError, r"text_schedule.threshold.*\[0, 1\]"),
    ({"image_schedule": schedules.adaptive(0.9, warmup=1)}, ValueError, "no warm-up"),
    ({"image_schedule": schedules.adaptive(0.9, max_skip=0.5)}, ValueError, "max_skip"),
    ({"decoder_schedule": schedules.adaptive(0.9)}, TypeError, "decoder_schedule must be DecayingThreshold"),
    ({"image_schedule": schedules.decaying(0.9)}, TypeError, "image_schedule must be AdaptiveSchedule"),
    ({"decoder_schedule": {"kind": "decaying", "threshold": 0.9}}, TypeError, "decoder_schedule"),
])
def test_bad_schedules(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        MuEConfig(**kwargs)


def test_scheduled_depth_checks_at_apply(florence, batch):
    _refused(florence, batch, MuEConfig(decoder_schedule=schedules.decaying(0.9, warmup=4)), ValueError,
             "decoder_schedule.warmup=4.*4 layers")
    _refused(florence, batch, MuEConfig(image_schedule=schedules.adaptive(0.9, num=6)), ValueError,
             "num=6.*encoder has 4")


def test_scheduled_config_round_trip(tmp_path):
    for cfg in (SCHEDULED, MuEConfig(decoder_schedule=schedules.decaying(0.9, decay=1, floor=0.9)),
                MuEConfig(text_schedule=schedules.adaptive(0.7, num=4), decoder_threshold=None)):
        again = SkipConfig.from_dict(cfg.to_json())
        assert again == cfg and isinstance(again.decoder_schedule, (schedules.DecayingThreshold, type(None)))
    SCHEDULED.save_pretrained(tmp_path)
    assert SkipConfig.from_pretrained(tmp_path) == SCHEDULED


@pytest.mark.parametrize("cfg", [
    MuEConfig(decoder_threshold=0.95, decay=0.9, floor=0.5),
    MuEConfig(decoder_threshold=1.0, decay=0.99, floor=0.9),  # never at position 0, from position 1 on
    MuEConfig(decoder_threshold=1.0, decay=1.0, floor=0.9),  # never
    MuEConfig(decoder_threshold=None),
    MuEConfig(decoder_schedule=schedules.decaying(0.97, decay=0.95, floor=0.8, warmup=2)),
], ids=["decaying", "from-1", "never", "none", "schedule"])
def test_decoder_threshold_table_is_the_configs(florence, cfg):
    """The per-position thresholds the decoder reads (a table, grown past 512 positions) are the
    config's own floats, and 'can any exit' agrees with them."""
    from mmskip.vision.mue.state import or_never

    with mmskip.applied(florence, cfg) as h:
        for past, q in ((0, 1), (3, 4), (0, 9), (509, 6), (1500, 2)):
            thr, active = h.state.decoder_thresholds(past, q, torch.device("cpu"))
            want = torch.tensor([or_never(cfg.decoder_threshold_at(t)) for t in range(past, past + q)])
            assert torch.equal(thr, want)
            assert active == bool((want < 1.0).any())


def test_one_token_exit_test_agrees_with_the_cosine():
    from mmskip.vision.mue.state import cosine, one_token_exits

    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        a = torch.randn(1, 1, 32, generator=g)
        b = a + torch.randn(1, 1, 32, generator=g) * float(torch.rand(1, generator=g))  # cosines over (-1, 1)
        c = float(cosine(a, b))
        for thr in (c - 1e-3, c + 1e-3, 0.9, 2.0):
            assert one_token_exits(a, b, thr) == (c > thr)
    assert not one_token_exits(torch.zeros(1, 1, 4), torch.zeros(1, 1, 4), 0.0)  # no direction: no exit
