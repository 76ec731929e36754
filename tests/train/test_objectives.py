"""The composable objectives: what each does to the forward and to the loss, and what each refuses."""

import math

import pytest
import torch

import mmskip
from mmskip import registry, schedules
from mmskip.train import (
    Distillation,
    EarlyExitLoss,
    LanguageModeling,
    LayerDropout,
    ScheduleAware,
    StepContext,
    TrainConfig,
    train,
)
from mmskip.train.objectives.early_exit import exit_layers, exit_scales
from mmskip.train.objectives.language_modeling import next_token_loss
from mmskip.train.objectives.layer_dropout import dropout_rates

from .._reference import recompute_logits
from ..conftest import tiny_lm
from .test_trainer import STREAM

IDS = torch.randint(3, 128, (3, 12), generator=torch.Generator().manual_seed(1))


def ctx(model, ids=IDS, step=0):
    logits = model(input_ids=ids, use_cache=False).logits
    return StepContext(step, 10, ids, logits, lambda: model(input_ids=ids, use_cache=False).logits)


def test_dropout_rates_follow_layerskip():
    r = dropout_rates(8, 0.2)
    assert r[0] == 0.0 and r[-1] == pytest.approx(0.2) and all(a < b for a, b in zip(r, r[1:]))
    assert dropout_rates(8, 0.2, step=0, total_steps=10, curriculum="exponential") == [0.0] * 8
    assert dropout_rates(8, 0.2, step=9, total_steps=10, curriculum="exponential") == pytest.approx(r)
    with pytest.raises(ValueError, match="curriculum"):
        LayerDropout(curriculum="linear")
    with pytest.raises(ValueError, match="p_max"):
        LayerDropout(p_max=1.0)


def test_layer_dropout_skips_per_sample_only_while_training():
    model = tiny_lm("llama", layers=4).train()
    adapter = registry.get_adapter(model)
    with torch.no_grad():
        plain = model(input_ids=IDS).logits
    drop = LayerDropout(0.5)
    drop.attach(model)
    drop.begin_step(0, 1)
    drop._rates = [0.0, 0.0, 0.0, 1.0]  # every sample drops the last layer
    try:
        dropped = model(input_ids=IDS).logits
        ref = recompute_logits(model, adapter, IDS, torch.ones_like(IDS), 0, skip_layers=[3])
        torch.testing.assert_close(dropped, ref, atol=1e-5, rtol=1e-5)
        with drop.paused():
            torch.testing.assert_close(model(input_ids=IDS).logits, plain)
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=IDS).logits, plain)
    finally:
        drop.detach()


def test_early_exit_scales_and_curricula():
    s = exit_scales(4, 1.0)
    assert s == [0.0, 1.0, 3.0, 3 + 3.0]  # e(l) = sum_{i<=l} i; last = L-1 + sum_{i<=L-2} i
    assert exit_scales(4, 0.0) == [0, 0, 0, 3]
    assert exit_layers(8, 0, 10, "rotational", 4, None) == [0, 4, 7]
    assert exit_layers(8, 1, 10, "rotational", 4, None) == [3, 7]
    assert exit_layers(8, 0, 10, "gradual", 4, None) == [7]
    assert exit_layers(8, 10, 10, "gradual", 4, None) == list(range(8))
    assert exit_layers(8, 3, 10, "none", 4, None) == list(range(8))


def test_early_exit_loss_reads_layers_through_the_shared_head():
    model = tiny_lm("llama", layers=4).train()
    adapter = registry.get_adapter(model)
    obj = EarlyExitLoss(e_scale=1.0, curriculum="none")
    obj.attach(model)
    obj.begin_step(0, 10)
    hidden = {}
    hooks = [adapter.layers[i].register_forward_hook(lambda m, a, o, i=i: hidden.__setitem__(i, o)) for i in range(4)]
    try:
        c = ctx(model)
        terms = obj.loss(c)
    finally:
        obj.detach()
        for h in hooks:
            h.remove()
    scales = exit_scales(4, 1.0)
    total = sum(scales)
    early = sum(scales[i] / total * next_token_loss(model.lm_head(model.model.norm(hidden[i])), IDS) for i in range(3))
    torch.testing.assert_close(terms["exit_early"], early)
    torch.testing.assert_close(terms["exit_last"], scales[3] / total * next_token_loss(c.logits, IDS))


def test_early_exit_with_zero_scale_is_the_plain_loss():
    model = tiny_lm("llama", layers=4).train()
    obj = EarlyExitLoss(e_scale=0.0)
    obj.attach(model)
    obj.begin_step(0, 10)
    try:
        c = ctx(model)
        terms = obj.loss(c)
    finally:
        obj.detach()
    torch.testing.assert_close(terms["exit_last"] + terms["exit_early"], LanguageModeling().loss(c)["lm"])


def test_early_exit_refuses_a_model_without_a_head():
    bare = tiny_lm("llama", layers=2).model  # LlamaModel: no LM head
    with pytest.raises(ValueError, match="ForCausalLM"):
        train(bare, [EarlyExitLoss()], STREAM, TrainConfig(steps=1, batch_size=2, seq_len=8), progress=False)


def test_distillation_from_an_unchanged_model_is_zero():
    model = tiny_lm("llama", layers=2)
    assert Distillation().loss(ctx(model))["distill"].abs() < 1e-6
    with pytest.raises(ValueError, match="temperature"):
        Distillation(temperature=0)


def test_schedule_aware_trains_only_the_layers_inference_keeps():
    model = tiny_lm("llama", layers=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = mmskip.LayerSkipConfig(schedule=schedules.explicit(skip=[2]))  # phase="decode": trained as "all"
    res = train(model, [ScheduleAware(config), LanguageModeling()], STREAM,
                TrainConfig(steps=3, batch_size=2, seq_len=12, lr=1e-2), progress=False)
    after = res.model.state_dict()
    changed = {k.split(".")[2] for k in before if k.startswith("model.layers.") and not torch.equal(before[k], after[k])}
    assert changed == {"0", "1", "3"}
    assert not hasattr(res.model, "_mmskip_handle")  # the schedule is removed after training


def test_schedule_aware_refuses_what_does_not_fit():
    with pytest.raises(TypeError, match="LayerSkipConfig"):
        ScheduleAware(mmskip.FFNSkipConfig())
    deep = ScheduleAware(mmskip.LayerSkipConfig(schedule=schedules.explicit(skip=[6])))
    with pytest.raises(ValueError):
        train(tiny_lm("llama", layers=4), [deep, LanguageModeling()], STREAM,
              TrainConfig(steps=1, batch_size=2, seq_len=8), progress=False)


def test_distillation_with_schedule_aware_uses_the_full_model_as_teacher():
    model = tiny_lm("llama", layers=4)
    sa = ScheduleAware(mmskip.LayerSkipConfig(schedule=schedules.explicit(skip=[1, 2])))
    sa.attach(model)
    try:
        with torch.no_grad():
            skipped = model(input_ids=IDS).logits
            with sa.paused():
                full = model(input_ids=IDS).logits
    finally:
        sa.detach()
    with torch.no_grad():
        assert torch.equal(full, model(input_ids=IDS).logits)
    assert not torch.allclose(skipped, full)
    assert math.isfinite(float(skipped.sum()))
