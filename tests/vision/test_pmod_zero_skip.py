"""p-MoD with nothing to route (keep 1.0 in every layer) costs no routing: the plain model's ops
plus the vision-token mask, on the tiny LLaVA (CPU float32)."""

from __future__ import annotations

from collections import Counter

import torch
from mmskip.vision import MoDConfig

import mmskip
from mmskip import schedules

from .._ops import op_counts


def test_ratio_one_everywhere_runs_no_routing(llava, batch, monkeypatch):
    """Nothing to route: the plain model's ops plus the vision-token mask (``eq``/``or``/``any`` per
    forward), no routing groups or padding reads, ``generate`` left unbound; the stats still count."""
    from mmskip.vision.pmod import hooks

    def never(*a, **k):
        raise AssertionError("routing ran with no MoD layer")

    monkeypatch.setattr(hooks, "group_sizes", never)
    monkeypatch.setattr(hooks, "select_kept", never)
    ref, plain = op_counts(lambda: llava.generate(**batch, max_new_tokens=3, do_sample=False))
    with mmskip.applied(llava, MoDConfig(schedule=schedules.ConstantSchedule(ratio=1.0))) as h:
        assert "generate" not in llava.__dict__
        out, zero = op_counts(lambda: llava.generate(**batch, max_new_tokens=3, do_sample=False))
        s = h.stats()
    assert torch.equal(out, ref)
    assert plain - zero == Counter()  # everything the plain model runs, and only the mask on top:
    assert set(zero - plain) <= {"zeros_like", "eq", "bitwise_or_", "any", "_local_scalar_dense"}
    assert (zero - plain)["any"] == 3  # one per forward (prefill + 2 decode steps)
    B, L = batch["input_ids"].shape
    assert s["mode"] == "mod" and s["mod_layers"] == {} and s["skipped"] == 0 and s["flops_fraction"] == 1.0
    assert s["items"]["layer.0"]["executed"] == B * (L + 2) and s["prefill_flops_fraction"] == 1.0
