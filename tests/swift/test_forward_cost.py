"""SWIFT's forward cost: what ``mmskip.tune`` ranks speculative decoding by (forwards, not FLOPs)."""

from __future__ import annotations

import pytest
import torch

import mmskip
from mmskip import schedules
from mmskip.registry import get_adapter
from mmskip.swift import SelfSpeculativeConfig
from mmskip.tuning.backends import measure
from mmskip.tuning.lm import CausalLMTarget
from mmskip.tuning.space import Candidate

from ..conftest import tiny_lm

G = torch.Generator().manual_seed(3)
PROMPTS = [torch.randint(3, 128, (10,), generator=G) for _ in range(3)]
FIXED = SelfSpeculativeConfig(attn_skip=(2, 3), mlp_skip=(4, 5), confidence=0.0, max_draft=3)


def _share(model: torch.nn.Module) -> float:
    """FIXED's draft FLOPs per token over the full model's, from the registry's adapter."""
    a = get_adapter(model, "decoder")
    layers = [a.attn_flops(i) + a.mlp_flops(i) for i in range(a.num_layers)]
    skipped = a.attn_flops(2) + a.attn_flops(3) + a.mlp_flops(4) + a.mlp_flops(5)
    full = sum(layers) + a.head_flops()
    return (full - skipped) / full


def test_forward_cost_counts_verifications_and_draft_forwards_by_their_share() -> None:
    model = tiny_lm("llama", layers=8)
    with mmskip.applied(model, FIXED) as handle:
        assert handle.state.forward_cost() is None  # nothing decoded yet
        with torch.no_grad():
            for p in PROMPTS:
                model.generate(input_ids=p[None], max_new_tokens=12, do_sample=False)
        s = handle.stats()
        cost = handle.state.forward_cost()
    share = _share(model)
    assert 0.5 < share < 1.0 and s["draft_forwards"] > 0
    assert cost == pytest.approx((s["verify_forwards"] + s["draft_forwards"] * share)
                                 / (s["generated_tokens"] - s["calls"]))


def test_other_techniques_have_no_forward_cost() -> None:
    model = tiny_lm("llama", layers=4)
    with mmskip.applied(model, mmskip.LayerSkipConfig(schedule=schedules.explicit(skip=[1]))) as handle:
        with torch.no_grad():
            model.generate(input_ids=PROMPTS[0][None], max_new_tokens=4, do_sample=False)
        assert handle.state.forward_cost() is None


def test_the_tuner_ranks_swift_by_its_forwards_and_layer_skipping_by_flops() -> None:
    model = tiny_lm("llama", layers=8)
    target = CausalLMTarget(model, max_new_tokens=8)
    ref = target.run(PROMPTS)
    swift = Candidate(configs=(FIXED,), label="swift")
    with target.applied(swift) as handles:  # what measure() does: the inputs, then the first again
        target.run(PROMPTS)
        target.run(PROMPTS[:1])
        expected = target.forward_cost(handles)
    rec = measure(target, swift, PROMPTS, ref, target.quality, "agreement", base_flops=1.0, base_s=1.0)
    assert expected is not None and rec["cost"] == pytest.approx(expected) == rec["forward_cost"]
    assert rec["q"] == 1.0  # lossless

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        target.run(PROMPTS[:1])
    skip = Candidate(configs=(mmskip.LayerSkipConfig(schedule=schedules.explicit(skip=[2, 3])),), label="skip")
    rec = measure(target, skip, PROMPTS, ref, target.quality, "agreement",
                  base_flops=float(counter.get_total_flops()), base_s=1.0)
    assert "forward_cost" not in rec and 0.5 < rec["cost"] < 1.0  # two of eight layers skipped while decoding


def test_a_measured_finalist_reports_its_forward_bound_beside_its_flops_bound() -> None:
    from mmskip.tuning import TuneResult
    from mmskip.tuning.result import Measured

    swift = Candidate(configs=(FIXED,), label="swift")
    m = Measured(swift, {"agreement": 1.0}, 1.3, (1.2, 1.4), flops_fraction=1.1, forward_fraction=0.8)
    assert m.forward_bound == pytest.approx(1.25) and m.flops_bound == pytest.approx(1 / 1.1)
    assert Measured.from_dict(m.to_dict()) == m
    base = Measured(Candidate(family="baseline", label="baseline"), {"agreement": 1.0}, flops_fraction=1.0)
    table = TuneResult(swift, "agreement", 1.0, [base, m]).table()
    assert "forward bound" in table and "| 0.91x | 1.25x |" in table and "| 1.00x | - |" in table
