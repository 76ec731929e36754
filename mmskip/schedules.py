"""The shared skip scheduler: decides *what* to skip; techniques decide *how*.

A schedule maps ``n`` items (layers, diffusion steps, MuE exits) to a keep ratio each:
``1.0`` = compute, ``0.0`` = skip, in between = the fraction of tokens a layer keeps
(Mixture-of-Depths).  ``adaptive`` decides at run time from a measured signal; ``decaying`` is a
run-time exit threshold that decays over generated tokens (MuE's decoder).

Every schedule is a frozen dataclass: deterministic, hashable and JSON round-trippable
(``to_dict`` / ``from_dict``).  ``n`` may be fixed in the schedule or supplied by the
technique when it applies the schedule to a model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

from ._fields import check_field_types

__all__ = [
    "Schedule",
    "UnifiedSchedule",
    "IntervalSchedule",
    "ExplicitSchedule",
    "ProgressiveSchedule",
    "AdaptiveSchedule",
    "ConstantSchedule",
    "DecayingThreshold",
    "unified",
    "interval",
    "explicit",
    "progressive",
    "constant",
    "adaptive",
    "decaying",
    "from_dict",
]

_KINDS: dict[str, type[Schedule]] = {}


@dataclass(frozen=True)
class Schedule:
    """Base class. Subclasses implement :meth:`ratios`."""

    kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            _KINDS[cls.kind] = cls
        own = cls.__dict__.get("__post_init__")

        def __post_init__(self: Schedule) -> None:
            check_field_types(self, f"{cls.kind}(): ")
            if own is not None:
                own(self)

        cls.__post_init__ = __post_init__

    # -- what a technique asks -------------------------------------------------------------
    def ratios(self, n: int | None = None) -> tuple[float, ...]:
        """Keep ratio per item (1.0 compute, 0.0 skip)."""
        raise NotImplementedError(f"{type(self).__name__} must implement ratios()")

    def keep(self, n: int | None = None) -> tuple[int, ...]:
        """Indices that are computed (ratio > 0)."""
        return tuple(i for i, r in enumerate(self.ratios(n)) if r > 0)

    def skip(self, n: int | None = None) -> tuple[int, ...]:
        """Indices that are skipped entirely (ratio == 0)."""
        return tuple(i for i, r in enumerate(self.ratios(n)) if r == 0)

    def kept_fraction(self, n: int | None = None) -> float:
        r = self.ratios(n)
        return sum(r) / len(r)

    # -- serialization ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"kind": self.kind, **{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def _n(self, n: int | None, own: int | None) -> int:
        if own is not None and n is not None and own != n:
            raise ValueError(f"{type(self).__name__} was built for {own} items but is applied to {n}.")
        value = own if own is not None else n
        if value is None:
            raise ValueError(
                f"{type(self).__name__} needs the number of items: pass num=... when building it, "
                "or apply it through a technique that knows the model's depth."
            )
        if value < 1:
            raise ValueError(f"number of items must be >= 1, got {value}")
        return value


def from_dict(d: dict[str, Any] | str) -> Schedule:
    """Rebuild a schedule from :meth:`Schedule.to_dict` output (or its JSON string).

    Anything else raises one ``ValueError`` that names the schedule kind, its fields and the
    offending value (not JSON, not an object, no or an unknown ``kind``, an unknown field, a
    field of the wrong type or out of range)."""
    example = '{"kind": "interval", "every": 2}'
    if isinstance(d, str):
        try:
            d = json.loads(d)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"schedules.from_dict(): not valid JSON ({err.msg} at position {err.pos}) in {d[:60]!r}; "
                f"pass a schedule's to_json(), e.g. {example}"
            ) from None
    if not isinstance(d, dict):
        raise ValueError(
            f"schedules.from_dict() takes a dict or JSON object as written by schedule.to_dict() / to_json() "
            f"(e.g. {example}), got {type(d).__name__} {d!r:.60}"
        )
    given, d = repr(d)[:60], dict(d)
    kind = d.pop("kind", None)
    if kind not in _KINDS:
        what = "has no 'kind'" if kind is None else f"has unknown kind {kind!r}"
        raise ValueError(f"schedules.from_dict(): {given} {what}; known kinds: {sorted(_KINDS)}")
    cls = _KINDS[kind]
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in d if k not in fields]
    if unknown:
        raise ValueError(
            f"schedules.from_dict(): the {kind!r} schedule has no field(s) {unknown}; its fields are {fields}"
        )
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
    except (TypeError, ValueError) as err:  # field types and ranges, checked by the schedule itself
        raise ValueError(f"schedules.from_dict(): bad {kind!r} schedule ({err}); its fields are {fields}") from None


@dataclass(frozen=True)
class UnifiedSchedule(Schedule):
    """Unified Layer Skipping (Liu et al., 2024): the keep set depends only on the target speedup.

    Keep ``k = int(L / s)`` layers, always the first and the last; the rest at a fixed integer
    interval ``int(L / (k - 1))`` from the bottom, so the skipped layers are spread through the
    middle rather than cut off at the top or bottom. L=30, s=5 keeps [0, 6, 12, 18, 24, 29].

    For s < 2 that integer interval is 1, which would put every skipped layer in one block
    just below the last layer — the contiguous skipping the paper argues against (on the zoo
    LM it agreed with the full model less at s=1.5 than at s=2). There, the ``L - k`` skipped
    layers are instead spread evenly over the middle layers 1..L-2.
    """

    kind: ClassVar[str] = "unified"
    speedup: float = 2.0
    num: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.speedup, (int, float)) or math.isnan(self.speedup) or self.speedup < 1:
            raise ValueError(f"unified(): speedup must be >= 1 (1 = skip nothing), got {self.speedup!r}")
        if self.num is not None and self.speedup > self.num:
            raise ValueError(f"unified(): speedup {self.speedup} exceeds the number of layers {self.num}")

    def ratios(self, n: int | None = None) -> tuple[float, ...]:
        L = self._n(n, self.num)
        if self.speedup > L:
            raise ValueError(f"unified(): speedup {self.speedup} exceeds the number of layers {L}")
        k = int(L / self.speedup)
        if k >= L:
            return (1.0,) * L
        if k == 1:
            kept = {0}
        elif int(L / (k - 1)) >= 2:
            step = int(L / (k - 1))
            kept = {i * step for i in range(k - 1)} | {L - 1}
        else:
            m, middle = L - k, L - 2
            skipped = {1 + int((j + 0.5) * middle / m) for j in range(m)}
            kept = set(range(L)) - skipped
        return tuple(1.0 if i in kept else 0.0 for i in range(L))


@dataclass(frozen=True)
class IntervalSchedule(Schedule):
    """Compute every ``every``-th item starting at ``offset`` (items before ``offset`` are computed).

    For diffusion steps this is DeepCache-style uniform refresh: step 0, k, 2k, ... recompute.
    """

    kind: ClassVar[str] = "interval"
    every: int = 2
    offset: int = 0
    num: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"interval(): every must be an integer >= 1, got {self.every!r}")
        if not isinstance(self.offset, int) or self.offset < 0:
            raise ValueError(f"interval(): offset must be an integer >= 0, got {self.offset!r}")

    def ratios(self, n: int | None = None) -> tuple[float, ...]:
        N = self._n(n, self.num)
        return tuple(1.0 if i < self.offset or (i - self.offset) % self.every == 0 else 0.0 for i in range(N))


@dataclass(frozen=True)
class ExplicitSchedule(Schedule):
    """A hand-picked set: give ``skip`` (indices to skip) or ``keep`` (indices to compute), not both.

    ``ratios`` may instead give a per-item keep ratio directly (e.g. measured MoD ratios).
    """

    kind: ClassVar[str] = "explicit"
    skip_idx: tuple[int, ...] | None = None
    keep_idx: tuple[int, ...] | None = None
    ratio_list: tuple[float, ...] | None = None
    num: int | None = None

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.skip_idx, self.keep_idx, self.ratio_list)]
        if sum(given) != 1:
            raise ValueError("explicit(): give exactly one of skip=..., keep=... or ratios=...")
        for name in ("skip_idx", "keep_idx"):
            idx = getattr(self, name)
            if idx is not None:
                if any((not isinstance(i, int)) or i < 0 for i in idx):
                    raise ValueError(f"explicit(): indices must be non-negative integers, got {idx!r}")
                if len(set(idx)) != len(idx):
                    raise ValueError(f"explicit(): duplicate indices in {idx!r}")
        if self.keep_idx is not None and len(self.keep_idx) == 0:
            raise ValueError("explicit(): keep=() would skip everything; keep at least one item")
        if self.ratio_list is not None and any(not 0.0 <= r <= 1.0 for r in self.ratio_list):
            raise ValueError(f"explicit(): ratios must lie in [0, 1], got {self.ratio_list!r}")

    def ratios(self, n: int | None = None) -> tuple[float, ...]:
        own = self.num if self.ratio_list is None else len(self.ratio_list)
        N = self._n(n, own)
        if self.ratio_list is not None:
            return tuple(float(r) for r in self.ratio_list)
        idx = self.skip_idx if self.skip_idx is not None else self.keep_idx
        bad = [i for i in idx if i >= N]
        if bad:
            raise ValueError(f"explicit(): indices {bad} out of range for {N} items")
        s = set(idx)
        if self.skip_idx is not None:
            return tuple(0.0 if i in s else 1.0 for i in range(N))
        return tuple(1.0 if i in s else 0.0 for i in range(N))


@dataclass(frozen=True)
class ProgressiveSchedule(Schedule):
    """p-MoD's progressive ratio decay: a shifted cosine keep ratio per layer.

    ``R_l = cos(pi * l / (L - 1)) / 2 + 1/2``; layers with ``R_l > ceiling`` keep every token
    (no MoD there), the rest keep ``max(R_l, floor)`` of their vision tokens.
    """

    kind: ClassVar[str] = "progressive"
    ceiling: float = 0.85
    floor: float = 0.15
    num: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.floor <= self.ceiling <= 1.0:
            raise ValueError(f"progressive(): need 0 <= floor <= ceiling <= 1, got floor={self.floor}, ceiling={self.ceiling}")

    def ratios(self, n: int | None = None) -> tuple[float, ...]:
        L = self._n(n, self.num)
        if L == 1:
            return (1.0,)
        out = []
        for layer in range(L):
            r = math.cos(math.pi * layer / (L - 1)) / 2 + 0.5
            out.append(1.0 if r > self.ceiling else max(r, self.floor))
        return tuple(out)


@dataclass(frozen=True)
class ConstantSchedule(Schedule):
    """One keep ratio for every item from ``first`` on; items before ``first`` keep 1.0.

    VideoLLM-MoD's schedule: each decoder layer after the first runs ~20 % of a frame's vision
    tokens (``constant(0.2)``).
    """

    kind: ClassVar[str] = "constant"
    ratio: float = 0.2
    first: int = 1
    num: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"constant(): ratio must lie in [0, 1], got {self.ratio}")
        if self.first < 0:
            raise ValueError(f"constant(): first must be >= 0, got {self.first}")

    def ratios(self, n: int | None = None) -> tuple[float, ...]:
        N = self._n(n, self.num)
        if self.first >= N:
            raise ValueError(f"constant(): first={self.first} leaves no item of {N} to apply ratio {self.ratio} to")
        return tuple(1.0 if i < self.first else float(self.ratio) for i in range(N))


Signal = Literal["cosine", "relative_change", "router", "l2_change"]


@dataclass(frozen=True)
class AdaptiveSchedule(Schedule):
    """Decide at run time by thresholding a measured signal.

    ``signal`` names what the technique measures: ``cosine`` similarity of a block's input and
    output (skip when >= threshold), ``relative_change`` of a cheap probe between steps
    (recompute when > threshold), ``router`` score (compute when >= threshold) or
    ``l2_change`` (LAC: a layer is active when its L2-norm change is >= threshold x the
    token's largest change). ``warmup`` leading items are always computed and ``max_skip``
    caps the skipped fraction.
    """

    kind: ClassVar[str] = "adaptive"
    threshold: float = 0.95
    signal: str = "cosine"
    warmup: int = 0
    max_skip: float = 1.0
    num: int | None = None

    def __post_init__(self) -> None:
        if self.signal not in ("cosine", "relative_change", "router", "l2_change"):
            raise ValueError(f"adaptive(): unknown signal {self.signal!r}; use cosine, relative_change, router or l2_change")
        if not isinstance(self.threshold, (int, float)) or math.isnan(self.threshold):
            raise ValueError(f"adaptive(): threshold must be a number, got {self.threshold!r}")
        if self.warmup < 0:
            raise ValueError(f"adaptive(): warmup must be >= 0, got {self.warmup}")
        if not 0.0 <= self.max_skip <= 1.0:
            raise ValueError(f"adaptive(): max_skip must lie in [0, 1], got {self.max_skip}")

    def ratios(self, n: int | None = None) -> tuple[float, ...]:
        # Nothing is skipped ahead of time; the technique calls compute() with its signal.
        return (1.0,) * self._n(n, self.num)

    def compute(self, value: float) -> bool:
        """True when the measured ``value`` says: compute this item."""
        if self.signal == "cosine":
            return value < self.threshold
        if self.signal == "relative_change":
            return value > self.threshold
        return value >= self.threshold  # router score, l2_change ratio


@dataclass(frozen=True)
class DecayingThreshold(Schedule):
    """A run-time exit threshold that decays over generated tokens (MuE's decoder exits).

    At generated position ``t`` (0 = the first decoder token) an item exits when its measured
    similarity is strictly above ``threshold_at(t) = max(floor, threshold * decay**t)``: later
    tokens exit more easily, never below ``floor``; ``decay=1`` keeps the threshold constant and
    a threshold of 1.0 on a cosine (at most 1) never exits. ``warmup`` leading items (layers)
    always run before an exit is allowed.

    :meth:`ratios` decides nothing ahead of time (like :class:`AdaptiveSchedule`): every item
    has keep ratio 1.0, since which items a token skips depends on what is measured at run time.
    """

    kind: ClassVar[str] = "decaying"
    threshold: float = 0.95
    decay: float = 0.99
    floor: float = 0.9
    warmup: int = 0

    def __post_init__(self) -> None:
        for name in ("threshold", "floor"):
            value = getattr(self, name)
            if math.isnan(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"decaying(): {name} must lie in [0, 1] (1.0 = never exit), got {value!r}")
        if self.floor > self.threshold:
            raise ValueError(
                f"decaying(): floor ({self.floor}) must not exceed threshold ({self.threshold}); the threshold "
                "decays from threshold down to floor"
            )
        if math.isnan(self.decay) or not 0.0 < self.decay <= 1.0:
            raise ValueError(f"decaying(): decay must lie in (0, 1] (1 = a constant threshold), got {self.decay!r}")
        if self.warmup < 0:
            raise ValueError(f"decaying(): warmup must be >= 0, got {self.warmup}")

    def threshold_at(self, t: int) -> float:
        """The exit threshold at generated position ``t`` (0-based): ``max(floor, threshold * decay**t)``."""
        if t < 0:
            raise ValueError(f"decaying(): position t must be >= 0, got {t}")
        return max(self.floor, self.threshold * self.decay**t)

    def compute(self, value: float, t: int = 0) -> bool:
        """True when the measured similarity ``value`` at position ``t`` says: keep computing
        (``value <= threshold_at(t)``; an exit needs a value strictly above the threshold)."""
        return not value > self.threshold_at(t)

    def ratios(self, n: int | None = None) -> tuple[float, ...]:
        # Nothing is skipped ahead of time; the technique thresholds its signal with threshold_at().
        return (1.0,) * self._n(n, None)


# -- the public constructors ------------------------------------------------------------------


def unified(speedup: float = 2.0, num: int | None = None) -> UnifiedSchedule:
    """Unified Layer Skipping keep set for a target ``speedup`` (see :class:`UnifiedSchedule`)."""
    return UnifiedSchedule(speedup=speedup, num=num)


def interval(every: int, offset: int = 0, num: int | None = None) -> IntervalSchedule:
    """Compute every ``every``-th item (see :class:`IntervalSchedule`)."""
    return IntervalSchedule(every=every, offset=offset, num=num)


def explicit(
    skip: list[int] | tuple[int, ...] | None = None,
    keep: list[int] | tuple[int, ...] | None = None,
    ratios: list[float] | tuple[float, ...] | None = None,
    num: int | None = None,
) -> ExplicitSchedule:
    """A hand-picked skip set, keep set, or per-item keep ratios (see :class:`ExplicitSchedule`)."""
    return ExplicitSchedule(skip_idx=_tuple(skip), keep_idx=_tuple(keep), ratio_list=_tuple(ratios), num=num)


def _tuple(x: list | tuple | None) -> tuple | None:
    return None if x is None else tuple(x)


def progressive(ceiling: float = 0.85, floor: float = 0.15, num: int | None = None) -> ProgressiveSchedule:
    """p-MoD progressive ratio decay (see :class:`ProgressiveSchedule`)."""
    return ProgressiveSchedule(ceiling=ceiling, floor=floor, num=num)


def constant(ratio: float = 0.2, first: int = 1, num: int | None = None) -> ConstantSchedule:
    """The same keep ``ratio`` for every item from ``first`` on (see :class:`ConstantSchedule`)."""
    return ConstantSchedule(ratio=ratio, first=first, num=num)


def adaptive(
    threshold: float, signal: Signal = "cosine", warmup: int = 0, max_skip: float = 1.0, num: int | None = None
) -> AdaptiveSchedule:
    """Threshold a measured signal at run time (see :class:`AdaptiveSchedule`)."""
    return AdaptiveSchedule(threshold=threshold, signal=signal, warmup=warmup, max_skip=max_skip, num=num)



def decaying(threshold: float, decay: float = 0.99, floor: float = 0.9, warmup: int = 0) -> DecayingThreshold:
    """An exit threshold decaying over generated tokens (see :class:`DecayingThreshold`)."""
    return DecayingThreshold(threshold=threshold, decay=decay, floor=floor, warmup=warmup)
