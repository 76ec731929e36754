"""SkipPipe: the path scheduler's constraints (no processes), stage splitting, and real gloo jobs."""

from __future__ import annotations

import random

import pytest
import torch

from mmskip.train.skippipe import (
    Node,
    ScheduleError,
    SkipPipeConfig,
    SkipPipeJobError,
    StageCosts,
    TrainSpec,
    launch,
    layer_ranges,
    plan,
    run_path,
    split,
)
from mmskip.train.skippipe.runtime import _batch, _data, _model

# -- the scheduler -----------------------------------------------------------------------------------


def _generated_configs(n: int = 40) -> list[SkipPipeConfig]:
    rng = random.Random(0)
    out = []
    while len(out) < n:
        stages, replicas = rng.choice([3, 4, 5, 6]), rng.choice([1, 2, 3])
        world = stages * replicas
        kw = dict(stages=stages, replicas=replicas, microbatches=rng.choice([2, 4, 6]),
                  skip_ratio=rng.choice([0.0, 0.25, 0.5]), keep_first=rng.choice([0, 1]),
                  swap_prob=rng.choice([0.0, 0.5, 1.0]), trials=4, schedule_seed=rng.randrange(100),
                  cross_replica=rng.random() < 0.8)
        if rng.random() < 0.5:
            kw["speed"] = tuple(rng.choice([1.0, 1.0, 2.0, 3.0]) for _ in range(world))
        if rng.random() < 0.5:
            kw["memory"] = rng.choice([2, 3, 8])
        try:
            out.append(SkipPipeConfig(**kw))
        except ValueError:
            continue
    return out


@pytest.mark.parametrize("cfg", _generated_configs(), ids=lambda c: f"S{c.stages}R{c.replicas}r{c.skip_ratio}")
def test_generated_schedules_respect_every_constraint(cfg):
    sched = plan(cfg, StageCosts())
    sched.check()  # skip ratio per stage, max skips, keep_first, adjacent swaps, replicas, memory, no overlap
    n, want = cfg.microbatches * cfg.replicas, cfg.skips_per_stage
    assert want == round(cfg.skip_ratio * n)
    assert all(c == (0 if s <= cfg.keep_first else want) for s, c in sched.skip_counts().items())
    assert all(len(p.skipped(cfg.stages)) <= cfg.skips_per_path for p in sched.paths)
    for node, peak in sched.peak_memory().items():
        assert cfg.node_memory(node) is None or peak <= cfg.node_memory(node)
    # every microbatch's work appears exactly once on the nodes of its path
    for p in sched.paths:
        ops = [(o.node, o.kind) for ops in sched.ops.values() for o in ops if o.microbatch == p.microbatch]
        assert sorted(k for _, k in ops) == sorted(["embed", "head", "embed_bwd"] + ["fwd", "bwd"] * len(p.hops))
        assert {n for n, k in ops if k in ("fwd", "bwd")} == set(p.hops)


def test_full_pipeline_without_skips_keeps_every_stage_in_order():
    sched = plan(SkipPipeConfig(stages=4, replicas=2, microbatches=3, cross_replica=False))
    for p in sched.paths:
        assert p.stages == (1, 2, 3) and all(h.replica == p.home.replica for h in p.hops)
    assert sched.collisions >= 0 and sched.makespan > 0


def test_skipping_shortens_the_planned_iteration():
    full = plan(SkipPipeConfig(stages=5, microbatches=8)).makespan
    half = plan(SkipPipeConfig(stages=5, microbatches=8, skip_ratio=0.5)).makespan
    assert half < 0.8 * full


def test_routing_sends_less_work_to_a_slow_replica():
    cfg = SkipPipeConfig(stages=3, replicas=2, microbatches=6, speed=(1, 1, 1, 1, 4, 1))
    sched = plan(cfg)
    slow, fast = Node(1, 1), Node(1, 0)
    count = {n: sum(1 for o in sched.ops.get(n, []) if o.kind == "fwd") for n in (slow, fast)}
    assert count[slow] < count[fast]
    fixed = plan(SkipPipeConfig(stages=3, replicas=2, microbatches=6, speed=(1, 1, 1, 1, 4, 1), cross_replica=False))
    assert sched.makespan < fixed.makespan


def test_swaps_are_single_adjacent_exchanges_after_keep_first():
    sched = plan(SkipPipeConfig(stages=6, microbatches=8, swap_prob=1.0, keep_first=1))
    assert any(p.swapped for p in sched.paths)
    for p in sched.paths:
        assert p.stages[0] == 1


def test_impossible_configs_say_what_to_change():
    with pytest.raises(ValueError, match="skip_ratio"):
        SkipPipeConfig(skip_ratio=1.0)
    with pytest.raises(ValueError, match="no middle stage may be skipped"):
        SkipPipeConfig(stages=3, keep_first=2, skip_ratio=0.5)
    with pytest.raises(ValueError, match="max_skips"):
        SkipPipeConfig(stages=4, skip_ratio=0.9, max_skips=1)
    with pytest.raises(ValueError, match="one positive factor per process"):
        SkipPipeConfig(stages=3, speed=(1.0, 2.0))
    with pytest.raises(ScheduleError, match="memory"):
        plan(SkipPipeConfig(stages=3, microbatches=4, memory=(4, 0, 4)))


def test_schedule_table_and_plot(tmp_path):
    sched = plan(SkipPipeConfig(stages=4, replicas=2, microbatches=3, skip_ratio=0.34, swap_prob=0.5))
    text = sched.table()
    assert "makespan" in text and text.count("\n| ") >= 6 + 8
    assert sched.plot(tmp_path / "gantt.png").stat().st_size > 2000


def test_config_round_trips_through_json():
    cfg = SkipPipeConfig(stages=3, replicas=2, speed=(1, 2, 1, 1, 1, 1), memory=(3,) * 6, skip_ratio=0.25)
    assert SkipPipeConfig.from_json(cfg.to_json()) == cfg


# -- stages -------------------------------------------------------------------------------------------


def test_split_model_runs_the_full_forward_and_any_path():
    spec = TrainSpec(layers=5, width=64, seq=16, data="synthetic", vocab=64)
    model = _model(spec, 64).eval()
    parts = split(model, 4)
    assert [list(r) for r in layer_ranges(5, 4)] == [[0, 1], [2, 3], [4]]
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert torch.allclose(run_path(parts, ids, [1, 2, 3]), model(input_ids=ids, labels=ids).loss, atol=1e-6)
        assert torch.isfinite(run_path(parts, ids, [3, 1]))
    with pytest.raises(ValueError, match="cannot fill"):
        layer_ranges(2, 4)


# -- real jobs (torchrun, gloo, CPU) --------------------------------------------------------------------

SPEC = dict(layers=4, width=64, seq=32, microbatch=4, data="synthetic", vocab=64, eval_windows=8)


def test_without_skips_gradients_equal_a_single_process_step(tmp_path):
    cfg = SkipPipeConfig(stages=3, microbatches=3)
    spec = TrainSpec(**SPEC, iterations=1, out=str(tmp_path), grads_out=str(tmp_path / "grads"))
    with pytest.raises(FileNotFoundError):  # grads_out stops the job before result.json
        launch(cfg, spec, timeout_s=240)
    from safetensors.torch import load_file

    got = {}
    for rank in range(3):
        got.update(load_file(str(tmp_path / "grads" / f"rank{rank}.safetensors")))
    train_ids, _, vocab = _data(spec)
    model = _model(spec, vocab)
    parts = split(model, 3)
    for mb in range(3):
        (run_path(parts, _batch(train_ids, spec, 0, mb), [1, 2]) / 3).backward()
    ref = {n: p.grad for n, p in model.named_parameters()}
    assert set(got) == set(ref)
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6)


def test_skippipe_job_trains_with_skips_swaps_and_replicas(tmp_path):
    cfg = SkipPipeConfig(stages=3, replicas=1, microbatches=4, skip_ratio=0.25, keep_first=0, swap_prob=0.5)
    rec = launch(cfg, TrainSpec(**SPEC, iterations=25, lr=1e-2, out=str(tmp_path / "a")), timeout_s=300)
    losses = [h["loss"] for h in rec["history"]]
    assert rec["iterations"] == 25 and losses[-1] < 0.7 * losses[0]
    assert rec["skip_counts"] == {"1": 1, "2": 1}
    assert rec["val_ppl_full"] < 64 and "val_ppl_half" in rec
    dp = launch(SkipPipeConfig(stages=2, replicas=2, microbatches=2),
                TrainSpec(**SPEC, iterations=8, lr=1e-2, out=str(tmp_path / "b")), timeout_s=300)
    assert dp["history"][-1]["loss"] < dp["history"][0]["loss"]


def test_a_failing_rank_fails_the_job_fast(tmp_path):
    import time

    t0 = time.perf_counter()
    with pytest.raises(SkipPipeJobError, match="fails on purpose"):
        launch(SkipPipeConfig(stages=3, microbatches=2), TrainSpec(**SPEC, iterations=50, fail_rank=1,
                                                                     out=str(tmp_path)), timeout_s=240)
    assert time.perf_counter() - t0 < 120


def test_cli_arguments_round_trip():
    from mmskip.train.skippipe.__main__ import parse_args
    from mmskip.train.skippipe.launch import cli_args

    cfg = SkipPipeConfig(stages=3, replicas=2, speed=(1, 2, 1, 1, 1, 1), memory=4, skip_ratio=0.25, cross_replica=False)
    spec = TrainSpec(**SPEC, iterations=3, time_limit_s=9.5, out="x")
    got_cfg, got_spec, _ = parse_args(cli_args(cfg, spec))
    assert got_cfg == cfg and got_spec == spec


