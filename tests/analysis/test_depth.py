import json

import pytest
import torch

from mmskip import analysis, registry
from mmskip.analysis import cli, depth

from ..conftest import tiny_lm


def make_identity(model, i):
    adapter = registry.get_adapter(model)
    with torch.no_grad():
        for module in (adapter.attention(i), adapter.mlp(i)):
            out_proj = module.o_proj if hasattr(module, "o_proj") else getattr(module, "down_proj", None)
            if out_proj is None:  # GPT-2: c_proj (Conv1D) in both sublayers
                out_proj = module.c_proj
            out_proj.weight.zero_()
            if getattr(out_proj, "bias", None) is not None:
                out_proj.bias.zero_()


def batch(n=3, length=16, seed=0):
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_identity_layer_contributes_nothing(family):
    model = tiny_lm(family, layers=6)
    make_identity(model, 3)
    c = depth.sublayer_contributions(model, batch())
    assert all(len(v) == 6 for v in c.values())
    assert c["attn"][3] == 0.0 and c["mlp"][3] == 0.0 and c["layer"][3] == 0.0
    assert all(c["attn"][i] > 0 and c["mlp"][i] > 0 for i in range(6) if i != 3)
    assert all(-1.0 <= v <= 1.0 for v in c["attn_cosine"] + c["mlp_cosine"])


def test_skip_effect_matrix_shape_and_known_cases():
    model = tiny_lm("llama", layers=6)
    make_identity(model, 2)
    e = depth.skip_effects(model, batch())
    res = torch.tensor(e["residual"])
    assert res.shape == (6, 6)
    assert torch.all(res.tril(-1) == 0)  # skipping i cannot change layers below it
    assert torch.all(res[2] == 0) and e["output_kl"][2] == pytest.approx(0.0, abs=1e-6)
    assert e["output_agreement"][2] == 1.0
    assert all(res[i, i] > 0 for i in range(6) if i != 2)
    assert all(res[i, 5] > 0 and e["output_kl"][i] > 0 for i in range(6) if i != 2)


def test_skip_effects_see_the_skipped_layer_in_hidden_states():
    model = tiny_lm("llama", layers=4)
    adapter = registry.get_adapter(model)
    with torch.no_grad():
        model(input_ids=batch(), output_hidden_states=True)  # transformers installs its capture hooks
    before = len(adapter.layers[1]._forward_hooks)
    with depth._skipping(adapter, [1]), torch.no_grad():
        hs = model(input_ids=batch(), output_hidden_states=True).hidden_states
    assert torch.equal(hs[2], hs[1])
    assert len(adapter.layers[1]._forward_hooks) == before


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sublayer_skip_is_the_shared_skip_unit_hook(family):
    """The analysis skips sublayers with the shared SkipUnitHook: the attention / MLP skip effects
    equal those of independent torch hooks zeroing that sublayer's output, and the modules are
    exactly as before afterwards."""
    from mmskip._skip_unit import SkipUnitHook

    model = tiny_lm(family, layers=4)
    adapter = registry.get_adapter(model)
    ids = batch()
    e = depth.skip_effects(model, ids)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    valid = torch.ones(ids.shape, dtype=torch.bool)
    for kind in ("attn", "mlp"):
        for i in range(4):
            unit = adapter.unit(kind, i)
            zero = unit.register_forward_hook(
                lambda m, a, out: (torch.zeros_like(out[0]), *out[1:]) if isinstance(out, tuple) else torch.zeros_like(out))
            with torch.no_grad():
                logits = model(input_ids=ids, use_cache=False).logits
            zero.remove()
            kl, agree = depth._output_effect(ref, logits, valid)
            assert e[f"{kind}_output_kl"][i] == pytest.approx(kl, rel=1e-5, abs=1e-7)
            assert e[f"{kind}_output_agreement"][i] == agree
    with depth._skipping(adapter, [1, 2], "mlp"):
        assert all(isinstance(adapter.mlp(i)._diffusers_hook.get_hook(depth._SKIP_HOOK), SkipUnitHook) for i in (1, 2))
    for module in model.modules():
        assert "_diffusers_hook" not in module.__dict__ and "forward" not in module.__dict__


def test_depth_report_suggests_identity_layers_and_writes_outputs(tmp_path):
    model = tiny_lm("llama", layers=8)
    for i in (3, 5):
        make_identity(model, i)
    ids = batch(4, 16)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    report = analysis.depth_report(model, ids, mask, min_agreement=0.99, max_skip=0.5, void_new_tokens=4)
    assert report.num_layers == 8 and report.tokens == 4 * 16 - 5
    assert len(report.curve) == 4 and [len(p["skipped"]) for p in report.curve] == [1, 2, 3, 4]
    assert set(report.curve[1]["skipped"]) == {3, 5} and report.curve[1]["output_agreement"] == 1.0
    assert {3, 5} <= set(report.suggested_skip) and 0 not in report.suggested_skip
    assert report.schedule().skip(8) == tuple(sorted(report.suggested_skip))
    assert len(report.voids["prompt"]) == len(report.voids["response"]) == 8
    assert report.voids["prompt"][3] == report.voids["prompt"][5] == 1.0  # identity layers change no norm
    paths = report.plot(tmp_path)
    assert [p.name for p in paths] == ["contributions.png", "skip_effect.png", "voids.png", "skip_curve.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    d = json.loads(report.to_json(tmp_path / "depth.json"))
    assert d["suggested_skip"] == report.suggested_skip and len(d["skip_effect"]["residual"]) == 8


def test_bad_input():
    model = tiny_lm("llama", layers=4)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        analysis.depth_report(model, torch.ones(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="max_skip"):
        analysis.depth_report(model, batch(), max_skip=1.0)
    with pytest.raises(FileNotFoundError, match="neither a zoo name"):
        cli.load_lm("/nonexistent/model")


class _CharTokenizer:
    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        return {"input_ids": torch.tensor([[3 + ord(ch) % 120 for ch in text]])}


def test_cli_end_to_end(tmp_path, monkeypatch, capsys):
    model = tiny_lm("llama", layers=4)
    monkeypatch.setattr(cli, "load_lm", lambda name: (model, _CharTokenizer()))
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 8)
    from mmskip.cli import main

    assert main(["analyze", "--model", "tiny", "--text", str(text), "--out", str(tmp_path / "out"),
                 "--chunks", "2", "--chunk-tokens", "24"]) == 0
    printed = capsys.readouterr().out
    assert "suggested skip" in printed and "4 layers" in printed
    d = json.loads((tmp_path / "out" / "depth.json").read_text())
    assert d["tokens"] == 48 and len(d["contributions"]["attn"]) == 4
    assert (tmp_path / "out" / "skip_effect.png").exists()
    with pytest.raises(ValueError, match="fewer than one chunk"):
        cli.chunk_text(_CharTokenizer(), "abc", 2, 24)


def test_sublayer_skip_effects_known_case():
    model = tiny_lm("llama", layers=4)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.zero_()  # MLP 2 adds nothing; attention 2 still does
    e = depth.skip_effects(model, batch())
    assert e["mlp_output_agreement"][2] == 1.0 and e["mlp_output_kl"][2] == pytest.approx(0.0, abs=1e-6)
    assert e["attn_output_kl"][2] > 0 and len(e["attn_output_agreement"]) == 4
