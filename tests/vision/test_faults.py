"""A ``KeyboardInterrupt`` inside a forward in the middle of ``generate`` leaves no trace: the next
``generate`` equals a fresh model's under the same technique, and ``remove()`` is still exact.
p-MoD, VideoLLM-MoD and MuE on tiny models, CPU float32, cached and uncached generation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from mmskip.vision import MoDConfig, MoDRouters, VideoMoDConfig
from mmskip.vision.mue import MuEConfig
from transformers import Florence2ForConditionalGeneration

import mmskip
from mmskip.inject import SkipConfig

from ._tiny import onevision_video_prompts, padded_prompts, tiny_llava, tiny_onevision
from ._tiny_florence import florence_prompts, tiny_florence

STEPS = 5
MUE = MuEConfig(image_threshold=0.965, text_threshold=0.95, decoder_threshold=0.94, decay=0.99, floor=0.85)


def _llava_layer(m):
    return m.model.language_model.layers[2]


# technique: (model factory, prompts, config from a routers folder, the module whose forward is
# interrupted: a decoder layer; for the router signal the MLP whose output its weight scales)
CASES: dict[str, tuple[Callable, Callable, Callable[[Path], SkipConfig], Callable]] = {
    "pmod": (tiny_llava, padded_prompts, lambda _: MoDConfig(), _llava_layer),
    "pmod-router": (tiny_llava, padded_prompts, lambda d: MoDConfig(signal="router", routers=str(d)),
                    lambda m: _llava_layer(m).mlp),
    "videomod": (tiny_onevision, onevision_video_prompts, lambda _: VideoMoDConfig(),
                 lambda m: m.model.language_model.layers[2]),
    "mue-decoder": (tiny_florence, florence_prompts, lambda _: MUE, lambda m: m.model.language_model.decoder.layers[2]),
    "mue-encoder": (tiny_florence, florence_prompts, lambda _: MUE, lambda m: m.model.language_model.encoder.layers[1]),
}
# (technique, on which call of its module the interrupt comes): the prompt's forward, or a later
# step (a decode step, or a no-cache recompute); the encoder runs once per generation
WHEN = [(case, at) for case in sorted(CASES) for at in (1, 3) if not (case == "mue-encoder" and at > 1)]


@pytest.fixture(scope="module")
def routers(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("routers")
    routers = MoDRouters.for_model(tiny_llava())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in routers.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    routers.save(folder)
    return folder


def _generate(model, batch, use_cache: bool):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=STEPS, do_sample=False, use_cache=use_cache,
                              output_logits=True, return_dict_in_generate=True)


def _forward(model, batch) -> torch.Tensor:
    """A plain no-cache forward's logits (Florence-2 with a 3-token decoder input)."""
    extra = {}
    if isinstance(model, Florence2ForConditionalGeneration):
        extra["decoder_input_ids"] = torch.full((batch["input_ids"].shape[0], 3), 2)
    with torch.no_grad():
        return model(**batch, **extra, use_cache=False).logits


def _next_calls(model, batch, other) -> dict:
    """What a user does next: generate with and without a cache, a forward on another prompt."""
    return {"cached": _generate(model, batch, True), "uncached": _generate(model, batch, False),
            "forward": _forward(model, other)}


def _same(a, b) -> None:
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits, strict=True))


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
@pytest.mark.parametrize("case,at", WHEN, ids=[f"{c}-{'prompt' if at == 1 else 'step'}" for c, at in WHEN])
def test_interrupt_mid_generate_leaves_no_trace(case, at, use_cache, routers):
    """The interrupt comes from a forward hook on one module, on its ``at``-th call. Afterwards
    cached and uncached generation, a forward on another prompt, and the technique's state equal
    a fresh application's."""
    build, prompts, config, module_of = CASES[case]
    cfg = config(routers)
    model, batch, other = build(), prompts(), prompts(seed=7)
    before = _generate(model, batch, use_cache)
    handle = mmskip.apply(model, cfg)
    calls = 0

    def interrupt(module, args, output):
        nonlocal calls
        calls += 1
        if calls == at:
            raise KeyboardInterrupt

    hook = module_of(model).register_forward_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        _generate(model, batch, use_cache)
    hook.remove()
    assert calls == at
    after = _next_calls(model, batch, other)
    stats = handle.state.stats()

    fresh = build()
    with mmskip.applied(fresh, cfg) as h:
        want = _next_calls(fresh, batch, other)
        assert h.state.stats() == stats
    _same(after["cached"], want["cached"])
    _same(after["uncached"], want["uncached"])
    assert torch.equal(after["forward"], want["forward"])
    handle.remove()
    _same(_generate(model, batch, use_cache), before)
    assert "generate" not in model.__dict__
