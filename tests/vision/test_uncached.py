"""``generate(use_cache=False)`` under every vision technique gives the tokens of the cached run.

Without a cache, ``generate`` runs the prompt and then, at every step, the prompt and the tokens
so far again. p-MoD / VideoLLM-MoD would route those recomputes afresh (the attention signal
reads another last token) and MuE would re-measure every earlier decoder exit; each generation
now replays its own first decisions (``mmskip.vision.generation_replay``). CPU float32, tiny models.
"""

from __future__ import annotations

import threading

import pytest
import torch
from mmskip.vision import MoDConfig, MoDRouters, VideoMoDConfig
from mmskip.vision.mue import MuEConfig
from transformers import StoppingCriteria, StoppingCriteriaList

import mmskip

from ._tiny import (
    onevision_prompts,
    onevision_video_prompts,
    padded_prompts,
    qwen_clip,
    qwen_video_prompt,
    tiny_llava,
    tiny_onevision,
    tiny_qwen2vl,
)
from ._tiny_florence import florence_prompts, tiny_florence

STEPS = 6


def _generate(model, batch, **kw):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=STEPS, do_sample=False, **kw)


def _routers(model, folder) -> str:
    routers = MoDRouters.for_model(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in routers.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    routers.save(folder)
    return str(folder)


def _kept(state) -> dict[int, torch.Tensor]:
    return {i: state.kept_vision_mask(i) for i in sorted(state.records)}


def _assert_same_generation(model, batch, cfg) -> None:
    """Cached and uncached greedy generation: equal tokens, and the uncached run's last forward
    routed the prompt's vision tokens as the cached prefill did."""
    with mmskip.applied(model, cfg) as h:
        cached = _generate(model, batch)
        kept = _kept(h.state)
        assert any(int(m.sum()) < int(h.state.vision.sum()) for m in kept.values())  # tokens were skipped
        uncached = _generate(model, batch, use_cache=False)
        L = batch["input_ids"].shape[1]
        assert h.state.vision.shape[1] == L + STEPS - 1  # the last recompute: prompt + generated tokens
        for i, mask in _kept(h.state).items():
            assert torch.equal(mask[:, :L], kept[i]), f"layer {i} routed the recompute differently"
    assert torch.equal(uncached, cached)
    assert "generate" not in model.__dict__  # remove() unbinds generate


@pytest.mark.parametrize("signal,attn", [("attention", "sdpa"), ("attention", "eager"), ("norm", "sdpa"),
                                         ("router", "sdpa")])
def test_pmod_uncached_generation_equals_cached(tmp_path, signal, attn):
    """Left-padded LLaVA batch; the attention signal used to route each recompute from its own
    last token and gave other tokens."""
    model = tiny_llava(attn=attn)
    routers = _routers(model, tmp_path) if signal == "router" else None
    _assert_same_generation(model, padded_prompts(), MoDConfig(signal=signal, routers=routers))


def test_pmod_onevision_images_uncached_equals_cached():
    _assert_same_generation(tiny_onevision(), onevision_prompts(), MoDConfig())


@pytest.mark.parametrize("signal", ["attention", "norm"])
def test_videomod_onevision_uncached_equals_cached(signal):
    """Rows with one and two videos (per-frame quotas, fill-up to the packed width)."""
    _assert_same_generation(tiny_onevision(), onevision_video_prompts(), VideoMoDConfig(signal=signal))


def test_videomod_qwen2vl_uncached_equals_cached():
    """3-D M-RoPE: the recompute gets the same per-frame routing."""
    _assert_same_generation(tiny_qwen2vl(), qwen_video_prompt([qwen_clip(), qwen_clip(t=2, seed=5)]),
                            VideoMoDConfig())


def test_pmod_each_generation_routes_its_own_prompt():
    """The replayed routing belongs to one generate call: the next call, on another prompt,
    routes that prompt (and again equals its cached run)."""
    model = tiny_llava()
    a, b = padded_prompts(seed=1), padded_prompts(seed=5)
    with mmskip.applied(model, MoDConfig()):
        want = _generate(model, b)
        _generate(model, a, use_cache=False)
        assert torch.equal(_generate(model, b, use_cache=False), want)


def test_pmod_user_pin_still_wins():
    """``pin_routing()`` replays the pinned prefill in every later forward, cached or not."""
    model = tiny_llava()
    a, b = padded_prompts(seed=1), padded_prompts(seed=5)
    with mmskip.applied(model, MoDConfig()) as h:
        _generate(model, a)
        h.state.pin_routing()
        pinned = _kept(h.state)
        _generate(model, b, use_cache=False)
        L = b["input_ids"].shape[1]
        for i, mask in _kept(h.state).items():
            assert torch.equal(mask[:, :L], pinned[i])


class _Pause(StoppingCriteria):
    """Holds its generation after step ``at`` until ``resume`` is set."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0
        self.paused, self.resume = threading.Event(), threading.Event()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.at:
            self.paused.set()
            assert self.resume.wait(120)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def _interleaved(model, cfg, a, b) -> None:
    """Two threads' uncached generations overlap: A pauses between steps, B starts and pauses, A
    resumes and finishes, then B. Each gets what it gets alone (the decisions a generation
    replays are its own call's, not the model's)."""
    with mmskip.applied(model, cfg):
        want = {"a": _generate(model, a), "b": _generate(model, b)}
        pauses, got = {"a": _Pause(at=2), "b": _Pause(at=2)}, {}

        def run(name: str, batch) -> None:
            got[name] = _generate(model, batch, use_cache=False, stopping_criteria=StoppingCriteriaList([pauses[name]]))

        threads = {name: threading.Thread(target=run, args=(name, batch)) for name, batch in (("a", a), ("b", b))}
        try:
            for name in ("a", "b"):
                threads[name].start()
                assert pauses[name].paused.wait(120)
            for name in ("a", "b"):
                pauses[name].resume.set()
                threads[name].join(120)
        finally:  # never leave a thread waiting
            for name in ("a", "b"):
                pauses[name].resume.set()
                if threads[name].ident is not None:
                    threads[name].join(120)
    assert torch.equal(got["a"], want["a"]) and torch.equal(got["b"], want["b"])


def test_pmod_uncached_generations_interleaved_across_threads():
    _interleaved(tiny_llava(), MoDConfig(), padded_prompts(seed=1), padded_prompts(seed=5))


# -- MuE ---------------------------------------------------------------------------------------------


EXITS = MuEConfig(image_threshold=0.965, text_threshold=0.95, decoder_threshold=0.94, decay=0.99, floor=0.85)


@pytest.mark.parametrize("padding,granularity", [("right", "token"), ("left", "modality")])
def test_mue_uncached_generation_equals_cached(padding, granularity):
    model, batch = tiny_florence(), florence_prompts(padding=padding)
    cfg = MuEConfig(image_threshold=0.96, text_threshold=0.94, encoder_granularity=granularity,
                    decoder_threshold=EXITS.decoder_threshold, decay=0.99, floor=0.85)
    with mmskip.applied(model, cfg) as h:
        cached = _generate(model, batch)
        exits = h.state.decoder_exits.clone()
        assert int((exits < 4).sum()) > 0  # some decoder tokens exited
        uncached = _generate(model, batch, use_cache=False)
        assert torch.equal(h.state.decoder_exits, exits)
    assert torch.equal(uncached, cached)
    assert "generate" not in model.__dict__


def test_mue_recompute_replays_earlier_exits():
    """A recompute computes every earlier decoder position again, with other numerics than the
    cached step that decided its exit (other shapes, kernels, precision). Simulated here: in
    multi-token forwards layer 2's output at earlier positions moves 0.1 % towards its input,
    lifting the one cosine that sat just below the threshold over it. The exits (and tokens)
    stay those of the cached run: earlier positions replay their exit, only the new one measures."""
    model, batch = tiny_florence(), florence_prompts()
    layer = model.model.language_model.decoder.layers[2]
    seen: list[torch.Tensor] = []
    probe = layer.register_forward_hook(
        lambda m, a, kw, o: seen.append(torch.nn.functional.cosine_similarity(
            (a[0] if a else kw["hidden_states"]).float(), (o[0] if isinstance(o, tuple) else o).float(), dim=-1)),
        with_kwargs=True)
    plain = _generate(model, batch)
    probe.remove()
    cos = torch.cat(seen, dim=1)  # (rows, positions) at layer 2, one position per cached step
    top = int(cos.argmax())
    assert top % STEPS < STEPS - 1  # an earlier position in the later recomputes
    # exits only after layer 3 (layer 2's output decides), and no token exits in the cached run
    cfg = MuEConfig(image_threshold=None, text_threshold=None, decoder_threshold=float(cos.max()) + 1e-5, decay=1.0,
                    floor=0.0, min_layers=3)
    inputs: dict[str, torch.Tensor] = {}

    def lift(module, args, out):
        if out.shape[1] == 1:
            return out
        out = out.clone()
        out[:, :-1] += 1e-3 * (inputs["h"][:, :-1] - out[:, :-1])
        return out

    with mmskip.applied(model, cfg) as h:
        cached = _generate(model, batch)
        assert torch.equal(cached, plain) and bool((h.state.decoder_exits == 4).all())
        hooks = [layer.register_forward_pre_hook(
                     lambda m, a, kw: inputs.__setitem__("h", a[0] if a else kw["hidden_states"]), with_kwargs=True),
                 layer.final_layer_norm.register_forward_hook(lift)]
        try:
            uncached = _generate(model, batch, use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
        assert bool((h.state.decoder_exits == 4).all()), h.state.decoder_exits.tolist()
    assert torch.equal(uncached, cached)


def test_mue_uncached_generations_interleaved_across_threads():
    _interleaved(tiny_florence(), EXITS, florence_prompts(seed=1), florence_prompts(seed=5))
