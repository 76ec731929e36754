"""warmup_cosine gives every former copy's learning rates, step by step (the old formulas inline)."""

import math

import pytest

from mmskip.train.lr_schedule import warmup_cosine


def _trainer_old(step: int, steps: int, warmup: int, floor: float) -> float:  # mmskip/train/trainer.py
    warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
    progress = min(1.0, step / max(steps - 1, 1))
    return warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _overlapped_old(s: int, steps: int, warm: int, floor: float) -> float:  # mue, recipes llava/stdlib_lm/video
    cos = math.cos(math.pi * min(1.0, s / steps))
    if floor == 0.05:
        return min(1.0, (s + 1) / max(1, warm)) * (0.05 + 0.95 * 0.5 * (1 + cos))
    return min(1.0, (s + 1) / max(1, warm)) * (0.1 + 0.9 * 0.5 * (1 + cos))


def _sequential_old(step: int, steps: int, warmup: int) -> float:  # relactrl train, assembly distill
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def _skippipe_old(progress: float) -> float:  # mmskip/train/skippipe/runtime.py
    if progress < 0.1:
        return max(progress / 0.1, 0.01)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - 0.1) / 0.9)))


@pytest.mark.parametrize("steps,warmup,floor", [(40, 0, 0.1), (40, 5, 0.1), (40, 5, 0.0), (1, 0, 0.1), (12, 30, 0.2)])
def test_trainer_rates_unchanged(steps, warmup, floor):
    for s in range(steps + 1):
        assert warmup_cosine(s, max(steps - 1, 1), warmup, floor) == _trainer_old(s, steps, warmup, floor)


@pytest.mark.parametrize("steps,warm,floor", [(40, 4, 0.05), (40, 0, 0.05), (37, 50, 0.1), (60, 6, 0.1)])
def test_overlapped_rates_unchanged(steps, warm, floor):
    for s in range(steps + 1):
        assert warmup_cosine(s, steps, warm, floor) == _overlapped_old(s, steps, warm, floor)


def test_video_vision_stage_is_flat_after_warmup():
    vision_steps, warm_v = 30, 3
    for s in range(vision_steps):
        assert warmup_cosine(s, vision_steps, warm_v, floor=1.0) == min(1.0, (s + 1) / warm_v)


@pytest.mark.parametrize("steps,warmup", [(40, 5), (40, 0), (40, 2), (100, 5), (3, 5)])
def test_sequential_rates_unchanged(steps, warmup):
    for s in range(steps + 1):
        if warmup == 0 and steps == 0:
            continue
        new = warmup_cosine(s, steps, warmup, 0.1, decay_after_warmup=True)
        assert new == _sequential_old(s, steps, warmup), s


def test_skippipe_rates_unchanged():
    for i in range(1001):
        p = i / 1000
        new = warmup_cosine(p, 1.0, 0.1, 0.1, decay_after_warmup=True, count_from=0, ramp_min=0.01)
        assert new == _skippipe_old(p), p


def test_shape():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(100, 100, 10, floor=0.2) == pytest.approx(0.2)
    assert warmup_cosine(500, 100, 10, floor=0.2) == pytest.approx(0.2)
    assert warmup_cosine(10, 100, 10, 0.0, decay_after_warmup=True) == 1.0
