"""MuE layer-wise training (``mmskip.vision.mue.train``) on a tiny random Florence-2, CPU float32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from mmskip.vision.mue import train as T
from transformers.models.bart.modeling_bart import shift_tokens_right

from ._tiny_florence import EOS, florence_prompts, tiny_florence


def _batch(seed: int = 1) -> dict[str, torch.Tensor]:
    b = florence_prompts((6, 3, 1), seed=seed)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(3, 98, (3, 5), generator=g)
    labels[1, 3:] = -100  # a shorter target
    b["labels"] = labels
    return b


@pytest.fixture
def model():
    return tiny_florence(encoder_layers=3, decoder_layers=3).train()


def test_loss_is_the_mean_of_every_decoder_layers_ce(model):
    b = _batch()
    loss, parts = T.layerwise_loss(model, b, encoder_mix=0.0)
    dec_in = shift_tokens_right(b["labels"], 1, EOS)
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                decoder_input_ids=dec_in, output_hidden_states=True)
    hs = out.decoder_hidden_states[1:]
    assert len(hs) == len(parts["decoder"]) == 3
    torch.testing.assert_close(model.lm_head(hs[-1]), out.logits)  # BART: no final norm, the LM head reads it
    with torch.no_grad():
        ces = [F.cross_entropy(model.lm_head(h).flatten(0, 1), b["labels"].flatten()) for h in hs]
    torch.testing.assert_close(loss, torch.stack(ces).mean())
    assert parts["decoder"] == pytest.approx([c.item() for c in ces], rel=1e-5)
    # the last layer's term is the model's own loss
    assert parts["final"] == pytest.approx(model(**b).loss.item(), rel=1e-5)
    assert parts["encoder_mix"] is None


def test_gradient_reaches_every_decoder_layer_through_its_own_exit(model):
    b = _batch()
    loss, _ = T.layerwise_loss(model, b, encoder_mix=0.0)
    loss.backward()
    dec = model.model.language_model.decoder.layers
    assert all(float(layer.fc2.weight.grad.abs().sum()) > 0 for layer in dec)
    # layer 1's exit is in the loss: its output gets a direct gradient even with the deeper layers cut off
    model.zero_grad()
    text = model.model.language_model
    full = text.decoder.layers
    text.decoder.layers = torch.nn.ModuleList(list(full)[:1])
    try:
        one, _ = T.layerwise_loss(model, b, encoder_mix=0.0)
    finally:
        text.decoder.layers = full
    one.backward()
    assert float(full[0].fc2.weight.grad.abs().sum()) > 0


def test_mixed_depth_memory_takes_each_token_from_one_encoder_layer(model):
    b = _batch()
    out = model(**b, output_hidden_states=True)
    hs = out.encoder_hidden_states
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    mem = T.mixed_depth(hs, g())
    assert torch.equal(mem, T.mixed_depth(hs, g()))
    layers = torch.stack(hs[1:])  # (L, B, N, d)
    match = (layers == mem[None]).all(-1)  # (L, B, N)
    assert match.any(0).all()
    picked = match.float().argmax(0)
    assert len(picked.unique()) == 3  # every layer is drawn somewhere
    # the encoder term trains the intermediate encoder layers too (their outputs feed the decoder directly)
    loss, parts = T.layerwise_loss(model, b, encoder_mix=1.0, generator=g())
    assert len(parts["encoder_mix"]) == 3
    loss.backward()
    assert all(float(layer.fc2.weight.grad.abs().sum()) > 0 for layer in model.model.language_model.encoder.layers)


def test_train_resume_equals_an_uninterrupted_run_and_saves_safetensors(tmp_path):
    batches = [_batch(s) for s in range(4)]
    kw = dict(lr=3e-3, warmup=1, progress=False, checkpoint_every=1, seed=5)
    a = tiny_florence(encoder_layers=2, decoder_layers=2)
    ra = T.train_mue(a, batches, steps=4, out=tmp_path / "a", **kw)
    def interrupted():  # a run of 4 steps that dies after its second batch
        yield from batches[:2]
        raise KeyboardInterrupt

    b = tiny_florence(encoder_layers=2, decoder_layers=2)
    with pytest.raises(KeyboardInterrupt):
        T.train_mue(b, interrupted(), steps=4, out=tmp_path / "b", save=False, **kw)
    assert not (tmp_path / "b" / "model.safetensors").exists()
    fresh = tiny_florence(encoder_layers=2, decoder_layers=2)  # resume loads the weights from the checkpoint
    rb = T.train_mue(fresh, batches, steps=4, out=tmp_path / "b", resume=True, **kw)
    assert ra["losses"] == pytest.approx(rb["losses"], rel=1e-4) and len(rb["losses"]) == 4
    for (n, p), (_, q) in zip(a.state_dict().items(), fresh.state_dict().items(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)
    assert all(0 < v < 20 for v in ra["losses"]) and ra["steps"] == 4 and len(ra["loss_curve"]) == 4
    assert (tmp_path / "a" / "model.safetensors").is_file() and (tmp_path / "a" / T.CHECKPOINT).is_file()
    assert not a.training
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        T.train_mue(a, batches, steps=4, out=tmp_path / "none", resume=True, progress=False)
    with pytest.raises(ValueError, match="ran out"):
        T.train_mue(a, batches, steps=6, out=tmp_path / "c", progress=False, save=False)


def test_refuses_a_model_without_an_encoder_decoder():
    with pytest.raises(TypeError, match="Florence2ForConditionalGeneration"):
        T.train_mue(torch.nn.Linear(2, 2), [], steps=1, out="unused", progress=False)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert T.main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--eval-n", "0"]) == 2
    assert "error" in capsys.readouterr().err
