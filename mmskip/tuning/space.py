"""What the tuner may change: a technique's declared tunable fields, and a candidate to measure.

A config class declares its search space with the classmethod ``SkipConfig.search_space(context)``:
the parameters to sample (:class:`Choice`, :class:`IntRange`, :class:`FloatRange`) and how a
sample becomes a config (``build``). The tuner reads only these declarations, so a new technique
becomes tunable by declaring its space, with no code in the tuner.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = ["Choice", "IntRange", "FloatRange", "Param", "Space", "TuneContext", "Candidate"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Choice:
    """One of ``values`` (JSON-able scalars)."""

    values: tuple[Any, ...]

    def __post_init__(self) -> None:
        if not self.values:
            raise ValueError("Choice needs at least one value")

    def suggest(self, trial: Any, name: str) -> Any:
        return trial.suggest_categorical(name, list(self.values))

    def distribution(self) -> Any:
        from optuna.distributions import CategoricalDistribution

        return CategoricalDistribution(list(self.values))


@dataclass(frozen=True)
class IntRange:
    """An integer in ``[low, high]`` on a grid of ``step``."""

    low: int
    high: int
    step: int = 1

    def __post_init__(self) -> None:
        if self.high < self.low or self.step < 1:
            raise ValueError(f"IntRange needs low <= high and step >= 1, got {self}")

    def suggest(self, trial: Any, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, step=self.step)

    def distribution(self) -> Any:
        from optuna.distributions import IntDistribution

        return IntDistribution(self.low, self.high, step=self.step)


@dataclass(frozen=True)
class FloatRange:
    """A float in ``[low, high]`` (log-uniform with ``log=True``)."""

    low: float
    high: float
    log: bool = False

    def __post_init__(self) -> None:
        if self.high <= self.low or (self.log and self.low <= 0):
            raise ValueError(f"FloatRange needs low < high (and low > 0 with log=True), got {self}")

    def suggest(self, trial: Any, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def distribution(self) -> Any:
        from optuna.distributions import FloatDistribution

        return FloatDistribution(self.low, self.high, log=self.log)


Param = Choice | IntRange | FloatRange


@dataclass(frozen=True)
class TuneContext:
    """What a config's ``search_space`` may read about the target.

    Attributes:
        model: the module the config is applied to (a causal LM, a VLM, a pipeline's denoiser).
        kind: ``"lm"``, ``"vlm"``, ``"encoder_decoder"`` or ``"denoiser"``.
        num_layers: decoder layers (language models) or ``None``.
        num_steps: the pipeline's baseline ``num_inference_steps`` (denoisers) or ``None``.
        facts: target-specific named facts (e.g. ``{"target_sets": {...}}`` for denoisers).
    """

    model: nn.Module
    kind: str
    num_layers: int | None = None
    num_steps: int | None = None
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Space:
    """One technique's tunable fields on one target.

    Attributes:
        technique: the config's technique id (the name the sample is logged under).
        params: field name -> what it may take.
        build: sampled values -> the config (raise ``ValueError`` for a combination that does not fit);
            the dict also holds the target settings sampled with them (e.g. ``num_inference_steps``)
            under their own names, so a step schedule can be built for the sampled step count.
        family: how the result table groups it (``"mmskip"``; a target's peers use their own name).
        seeds: a few known-good samples (e.g. the paper's setting) the search tries first: values of
            ``params`` and, optionally, of target settings (``num_inference_steps``, ``sampler``);
            what a seed leaves out is sampled.
    """

    technique: str
    params: dict[str, Param]
    build: Callable[[dict[str, Any]], Any]
    family: str = "mmskip"
    seeds: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class Candidate:
    """One setting the tuner measures: configs to apply, plus the target's own settings.

    Attributes:
        configs: mmskip configs applied together (empty: none).
        settings: target settings, e.g. ``{"num_inference_steps": 12, "scheduler": "dpm++2m"}``, or
            a peer's (``{"cache": "FirstBlockCache", "threshold": 0.1}``).
        family: ``"baseline"``, ``"fewer-steps"``, ``"mmskip"`` or a peer's name.
        label: a short human-readable description.
        params: the sampled values it was built from (for the trial log).
    """

    configs: tuple[Any, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)
    family: str = "mmskip"
    label: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """A stable identity: equal keys measure the same thing."""
        return json.dumps({"configs": [c.to_dict() for c in self.configs], "settings": self.settings},
                          sort_keys=True, default=str)

    def to_dict(self) -> dict[str, Any]:
        return {"configs": [c.to_dict() for c in self.configs], "settings": dict(self.settings),
                "family": self.family, "label": self.label, "params": dict(self.params)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Candidate:
        from ..inject import SkipConfig

        return Candidate(tuple(SkipConfig.from_dict(c) for c in d.get("configs", [])), dict(d.get("settings", {})),
                         d.get("family", "mmskip"), d.get("label", ""), dict(d.get("params", {})))


def describe(technique: str, values: dict[str, Any], settings: dict[str, Any]) -> str:
    """``"layer_skip speedup=1.4 phase=all | steps=12"``-style label of a sample."""
    parts = [technique] if technique != "none" else []
    parts += [f"{k}={_short(v)}" for k, v in values.items()]
    extra = " ".join(f"{k}={_short(v)}" for k, v in settings.items())
    text = " ".join(parts)
    return f"{text} | {extra}" if text and extra else (text or extra or "baseline")


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def spaces_of(config_classes: Sequence[type], context: TuneContext) -> list[Space]:
    """The declared spaces of ``config_classes`` on ``context`` (classes declaring none are left out)."""
    out = []
    for cls in config_classes:
        space = cls.search_space(context)
        if space is not None:
            out.append(space)
    return out


def combine(first: Space, second: Space) -> Space:
    """The space of two techniques applied together (e.g. feature inheritance on the denoiser plus an
    analytic jump over the first steps): technique ``"a+b"``, each field named ``"a:field"``; its build
    returns both configs. The target decides which pairs compose (a pipeline: one model-level technique
    plus sampler-level ones); the seed is the first space's first seed with the second's, if any."""
    def split(values: dict[str, Any], space: Space) -> dict[str, Any]:
        mine = {k.split(":", 1)[1]: v for k, v in values.items() if k.startswith(space.technique + ":")}
        shared = {k: v for k, v in values.items() if ":" not in k}  # target settings (num_inference_steps, ...)
        return {**shared, **mine}

    def build(values: dict[str, Any]) -> tuple[Any, Any]:
        a, b = first.build(split(values, first)), second.build(split(values, second))
        if isinstance(a, dict) or isinstance(b, dict):
            raise ValueError("a peer's settings do not combine with another technique")
        return a, b

    params = {f"{sp.technique}:{k}": p for sp in (first, second) for k, p in sp.params.items()}
    seeds: tuple[dict[str, Any], ...] = ()
    if first.seeds:  # what the second space's seed leaves out (or a second space without seeds) is sampled
        both = [(sp, sp.seeds[0]) for sp in (first, second) if sp.seeds]
        seed = {f"{sp.technique}:{k}": v for sp, sd in both for k, v in sd.items() if k in sp.params}
        seed.update({k: v for sp, sd in both for k, v in sd.items() if k not in sp.params})
        seeds = (seed,)
    return Space(f"{first.technique}+{second.technique}", params, build, first.family, seeds)


__all__ += ["describe", "spaces_of", "combine"]
