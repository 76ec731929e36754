"""Relevance-guided allocation: which positions get a control block, and how wide (RelaCtrl)."""

from __future__ import annotations

from dataclasses import dataclass

from .relevance import RelevanceReport

__all__ = ["BranchPlan", "allocate"]


@dataclass(frozen=True)
class BranchPlan:
    """Where RelaCtrl's blocks go (base positions, increasing) and each block's channel-mixer ratio."""

    positions: tuple[int, ...]
    mlp_ratios: tuple[float, ...]


def allocate(report: RelevanceReport, num_blocks: int, max_ratio: float = 4.0, min_ratio: float = 1.0) -> BranchPlan:
    """Put ``num_blocks`` control blocks at the most relevant positions of ``report``; each block's
    channel-mixer width scales with its relevance, from ``min_ratio`` (least relevant chosen) to
    ``max_ratio`` (most relevant), rounded to halves."""
    if not 1 <= num_blocks <= len(report.positions):
        raise ValueError(f"num_blocks must be between 1 and the {len(report.positions)} analysed positions, "
                         f"got {num_blocks}")
    if not 0 < min_ratio <= max_ratio:
        raise ValueError(f"need 0 < min_ratio <= max_ratio, got {min_ratio} and {max_ratio}")
    ranked = sorted(zip(report.scores, report.indices, strict=True), key=lambda t: -t[0])[:num_blocks]
    hi, lo = ranked[0][0], ranked[-1][0]
    chosen = sorted(ranked, key=lambda t: t[1])

    def ratio(score: float) -> float:
        share = 1.0 if hi - lo <= 1e-12 else (score - lo) / (hi - lo)
        return round(2 * (min_ratio + share * (max_ratio - min_ratio))) / 2

    return BranchPlan(tuple(i for _, i in chosen), tuple(ratio(s) for s, _ in chosen))
