"""mmskip.train.train: the loop, checkpoints and resume, accumulation, LoRA, and refusals before training."""

import pytest
import torch

from mmskip.train import EarlyExitLoss, LanguageModeling, LayerDropout, TrainConfig, train

from ..conftest import tiny_lm

# a stream with structure a tiny model can learn quickly: repeated short random phrases
_G = torch.Generator().manual_seed(0)
PHRASES = torch.randint(3, 128, (8, 6), generator=_G)
STREAM = PHRASES[torch.randint(0, 8, (600,), generator=_G)].flatten()


def cfg(**kw):
    base = dict(steps=6, batch_size=4, seq_len=16, lr=1e-2, log_every=1)
    return TrainConfig(**{**base, **kw})


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_language_modeling_lowers_held_out_loss():
    model = tiny_lm("llama", layers=2)
    res = train(model, [LanguageModeling()], STREAM, cfg(steps=40, eval_every=20, eval_windows=4),
                eval_data=STREAM, progress=False)
    evals = res.evaluations
    assert len(evals) == 2 and evals[-1]["eval_loss"] < 0.6 * torch.log(torch.tensor(128.0)).item()
    assert res.steps == 40 and res.model is model


def test_resume_reproduces_an_uninterrupted_run_exactly(tmp_path):
    objectives = lambda: [LayerDropout(0.5), EarlyExitLoss(rotation=2)]  # noqa: E731  (random draws + curriculum)
    c = cfg(steps=8, save_every=3)
    full = train(tiny_lm("llama", layers=4), objectives(), STREAM, c, out=tmp_path / "a", progress=False)
    part = train(tiny_lm("llama", layers=4), objectives(), STREAM, c, out=tmp_path / "b", progress=False, stop_at=5)
    assert part.steps == 5
    resumed = train(tiny_lm("llama", layers=4), objectives(), STREAM, c, out=tmp_path / "b", resume=True,
                    progress=False)
    a, b = weights(full.model), weights(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["step"] for h in resumed.history] == [h["step"] for h in full.history]


def test_checkpoint_of_another_model_is_refused_before_training(tmp_path):
    train(tiny_lm("llama", layers=2), [LanguageModeling()], STREAM, cfg(steps=1), out=tmp_path, progress=False)
    other = tiny_lm("llama", layers=3)
    before = weights(other)
    with pytest.raises(ValueError, match="written for"):
        train(other, [LanguageModeling()], STREAM, cfg(steps=2), out=tmp_path, resume=True, progress=False)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())


def test_gradient_accumulation_matches_one_big_batch():
    a, b = tiny_lm("llama", layers=2), tiny_lm("llama", layers=2)
    ra = train(a, [LanguageModeling()], STREAM, cfg(steps=3, lr=1e-3), progress=False)
    rb = train(b, [LanguageModeling()], STREAM, cfg(steps=3, lr=1e-3, grad_accum=2), progress=False)
    wa, wb = weights(ra.model), weights(rb.model)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


def test_bf16_mixed_precision_runs_on_this_device():
    res = train(tiny_lm("llama", layers=2), [LanguageModeling()], STREAM, cfg(steps=2, mixed_precision="bf16"),
                progress=False)
    assert torch.isfinite(torch.tensor(res.history[-1]["loss"]))


def test_lora_trains_adapters_and_merges_back():
    pytest.importorskip("peft")
    model = tiny_lm("llama", layers=2)
    before = weights(model)
    res = train(model, [LanguageModeling()], STREAM, cfg(steps=3, trainable="lora", lora_rank=4), progress=False)
    assert type(res.model).__name__ == "LlamaForCausalLM"
    after = weights(res.model)
    assert set(after) == set(before)  # no adapter tensors left: merged
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert not torch.equal(after["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"])
    assert all(p.requires_grad for p in res.model.parameters())  # the caller's flags come back


@pytest.mark.parametrize("objectives, config, data, match", [
    ([], {}, STREAM, "at least one objective"),
    ([LanguageModeling(), LanguageModeling()], {}, STREAM, "given 2 times"),
    ([LayerDropout()], {}, STREAM, "has a loss"),
    ([EarlyExitLoss(), LanguageModeling()], {}, STREAM, "already includes"),
    ([LanguageModeling()], {"trainable": "none"}, STREAM, "trains only objectives"),
    ([LanguageModeling()], {}, STREAM[:10], "has 10 tokens"),
    ([LanguageModeling()], {}, torch.tensor([], dtype=torch.int64), "has 0 tokens"),
])
def test_bad_input_is_refused_before_training(objectives, config, data, match):
    model = tiny_lm("llama", layers=2)
    before = weights(model)
    with pytest.raises(ValueError, match=match):
        train(model, objectives, data, cfg(**config), progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_bad_config_and_data_types():
    with pytest.raises(ValueError, match="multiple of grad_accum"):
        TrainConfig(batch_size=5, grad_accum=2)
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")
    with pytest.raises(TypeError, match="1-D integer tensor"):
        train(tiny_lm("llama", layers=2), [LanguageModeling()], torch.rand(100), cfg(), progress=False)
    with pytest.raises(ValueError, match="needs the out folder"):
        train(tiny_lm("llama", layers=2), [LanguageModeling()], STREAM, cfg(), resume=True, progress=False)
