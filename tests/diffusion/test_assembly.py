"""Model assembly: measured edits, an assembled UNet equal to the bypassed teacher, ME-CondConv, distillation."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from mmskip.diffusion import assembly
from torch import nn

from ._tiny import tiny_unet


def _inputs(n: int = 3, seed: int = 0) -> assembly.CalibrationBatch:
    g = torch.Generator().manual_seed(seed)
    return assembly.CalibrationBatch(torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g),
                                     torch.randn(n, 5, 16, generator=g))


def _out(unet, b):
    with torch.no_grad():
        return unet(b.sample, b.timestep, b.context).sample


def test_candidate_edits_of_a_two_level_unet():
    names = [e.name for e in assembly.candidate_edits(tiny_unet())]
    assert names == ["mid", "down_attn.0", "down_attn.1", "up_attn.0", "up_attn.1"]
    deep = [e.name for e in assembly.candidate_edits(tiny_unet(sdxl=True))]
    assert "depth.1" in deep and "depth.0" not in deep  # only blocks with >= 2 transformer layers


@pytest.mark.parametrize("edits", [["mid"], ["down_attn.0"], ["up_attn.1"], ["mid", "down_attn.1", "up_attn.0"]])
def test_assembled_unet_equals_the_bypassed_teacher(edits):
    teacher, b = tiny_unet(), _inputs()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ref = _out(teacher, b)
    by = {e.name: e for e in assembly.candidate_edits(teacher)}
    from contextlib import ExitStack

    with ExitStack() as stack:
        for name in edits:
            stack.enter_context(assembly.bypassed(teacher, by[name]))
        expected = _out(teacher, b)
    student = assembly.assemble_unet(teacher, edits)
    assert isinstance(student, UNet2DConditionModel)  # a plain diffusers UNet: any pipeline loads it
    assert torch.equal(_out(student, b), expected)
    assert not torch.equal(expected, ref)
    assert assembly.parameter_count(student) < assembly.parameter_count(teacher)
    # the teacher is untouched and its bypass hooks are gone
    assert torch.equal(_out(teacher, b), ref)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert not any(hasattr(m, "_diffusers_hook") for m in teacher.modules())


def test_depth_edit_drops_the_last_transformer_layer():
    teacher, b = tiny_unet(sdxl=True), _inputs()
    added = {"text_embeds": torch.randn(3, 16), "time_ids": torch.randn(3, 6)}
    (edit,) = [e for e in assembly.candidate_edits(teacher) if e.name == "depth.1"]
    with torch.no_grad(), assembly.bypassed(teacher, edit):
        expected = teacher(b.sample, b.timestep, b.context, added_cond_kwargs=added).sample
    student = assembly.assemble_unet(teacher, ["depth.1"])
    assert student.config.transformer_layers_per_block == [1, 1]
    with torch.no_grad():
        assert torch.equal(student(b.sample, b.timestep, b.context, added_cond_kwargs=added).sample, expected)


def test_assembled_unet_round_trips_through_save_pretrained(tmp_path):
    student = assembly.assemble_unet(tiny_unet(), ["mid"])
    student.save_pretrained(tmp_path)
    loaded = UNet2DConditionModel.from_pretrained(tmp_path)
    b = _inputs()
    assert loaded.config.mid_block_type is None
    assert torch.equal(_out(loaded, b), _out(student, b))


def test_bad_edits_and_models_are_refused():
    with pytest.raises(ValueError, match="unknown or inapplicable edits"):
        assembly.assemble_unet(tiny_unet(), ["depth.0"])
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        assembly.candidate_edits(nn.Linear(2, 2))


def test_importance_and_choice():
    unet, b = tiny_unet(), _inputs()
    imp = assembly.edit_importance(unet, [b])
    sav = assembly.edit_savings(unet, b)
    assert set(imp) == set(sav) == {e.name for e in assembly.candidate_edits(unet)}
    assert all(v > 0 for v in imp.values()) and all(0 < v < 1 for v in sav.values())
    chosen = assembly.choose_edits(imp, sav, speedup=1.05)
    saved = sum(sav[c] for c in chosen)
    assert 1 / (1 - saved) >= 1.05 and chosen
    # the first pick is the cheapest quality loss per FLOP saved
    assert chosen[0] == min(imp, key=lambda k: imp[k] / sav[k])
    with pytest.raises(ValueError, match="out of reach"):
        assembly.choose_edits(imp, sav, speedup=50.0)
    with pytest.raises(ValueError, match="speedup must be > 1"):
        assembly.choose_edits(imp, sav, speedup=1.0)


def test_condconv_with_one_expert_is_the_convolution():
    torch.manual_seed(0)
    conv, x = nn.Conv2d(6, 8, 3, padding=1), torch.randn(3, 6, 5, 5)
    assert torch.equal(assembly.MECondConv2d(conv, 1)(x), conv(x))


def test_condconv_mixes_experts_per_sample():
    torch.manual_seed(0)
    conv, x = nn.Conv2d(6, 8, 3, padding=1), torch.randn(3, 6, 5, 5)
    layer = assembly.MECondConv2d(conv, 4)
    assert torch.allclose(layer(x), conv(x), atol=1e-6)  # copies of the kernel: unchanged at insertion
    with torch.no_grad():
        layer.router.weight.normal_()
        layer.weight[1:].normal_()
    y, r = layer(x), layer.routing(x)
    assert not torch.allclose(r[0], r[1])  # routing depends on the sample
    for i in range(3):
        w = torch.einsum("e,e...->...", r[i], layer.weight)
        bias = r[i] @ layer.bias
        assert torch.allclose(y[i:i + 1], nn.functional.conv2d(x[i:i + 1], w, bias, padding=1), atol=1e-5)


def test_condconv_in_a_unet_saves_and_loads(tmp_path):
    unet, b = assembly.assemble_unet(tiny_unet(), ["mid"]), _inputs()
    names = assembly.insert_condconv(unet, num_experts=3)
    assert names and all(n.endswith(("conv1", "conv2")) for n in names)
    with torch.no_grad():
        for m in unet.modules():
            if isinstance(m, assembly.MECondConv2d):
                m.router.weight.normal_()
                m.weight[1:].mul_(1.1)
    assembly.save_assembled(unet, tmp_path)
    loaded = assembly.load_assembled(tmp_path)
    assert torch.equal(_out(loaded, b), _out(unet, b))


def test_distillation_lowers_the_loss_and_resumes(tmp_path):
    teacher = tiny_unet()
    g = torch.Generator().manual_seed(0)
    lat, ctx = torch.randn(16, 4, 8, 8, generator=g), torch.randn(16, 5, 16, generator=g)

    def batches(step):
        i = torch.randint(0, 16, (8,), generator=torch.Generator().manual_seed(step))
        return lat[i], ctx[i]

    noise = DDPMScheduler(num_train_timesteps=1000)
    student = assembly.assemble_unet(teacher, ["mid", "up_attn.1"])
    assert assembly.shared_features(teacher, student) == ["down_blocks.0", "down_blocks.1", "up_blocks.0", "up_blocks.1"]
    b = _inputs(8, seed=3)
    before = (_out(student, b) - _out(teacher, b)).pow(2).mean()
    cfg = assembly.DistillConfig(steps=30, lr=2e-3, ema=0.0, checkpoint_every=10)
    hist = assembly.distill(student, teacher, batches, noise, cfg, out=tmp_path)
    after = (_out(student, b) - _out(teacher, b)).pow(2).mean()
    assert after < before
    assert hist[0]["step"] == 0 and (tmp_path / "checkpoint").is_dir()
    # a rerun with the same folder resumes at the end: no steps left, weights from the checkpoint
    again = assembly.assemble_unet(teacher, ["mid", "up_attn.1"])
    assembly.distill(again, teacher, batches, noise, cfg, out=tmp_path)
    assert torch.equal(_out(again, b), _out(student, b))
