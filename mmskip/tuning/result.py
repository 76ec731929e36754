"""What ``mmskip.tune`` returns: the best candidate, the measured front, and ways to look at them."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .._config_files import write_configs
from .space import Candidate

__all__ = ["Measured", "TuneResult", "RESULT_NAME"]

logger = logging.getLogger(__name__)

RESULT_NAME = "mmskip_tune.json"


@dataclass
class Measured:
    """One candidate measured on the held-out inputs.

    Attributes:
        candidate: what was measured.
        quality: held-out quality against the baseline's outputs (the tuned metric and any others).
        speedup: median paired ratio baseline / candidate seconds (1.0 for the baseline itself).
        spread: lower and upper quartile of the paired ratios.
        flops_fraction: measured FLOPs of the candidate / the baseline's on the held-out inputs.
        forward_fraction: for speculative decoding, its forwards per token relative to the
            baseline's on the held-out inputs (``TechniqueState.forward_cost``); its bound is
            ``1 / forward_fraction`` (its FLOPs bound is below 1: speculation adds FLOPs).
        seconds: the candidate's median seconds per held-out call; ``baseline_seconds`` the baseline's.
        calibration: the calibration figures the search ranked it by.
    """

    candidate: Candidate
    quality: dict[str, float]
    speedup: float = 1.0
    spread: tuple[float, float] = (1.0, 1.0)
    flops_fraction: float | None = None
    seconds: float | None = None
    baseline_seconds: float | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    forward_fraction: float | None = None

    @property
    def flops_bound(self) -> float | None:
        return 1.0 / self.flops_fraction if self.flops_fraction else None

    @property
    def forward_bound(self) -> float | None:
        return 1.0 / self.forward_fraction if self.forward_fraction else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["candidate"] = self.candidate.to_dict()
        d["flops_bound"], d["forward_bound"] = self.flops_bound, self.forward_bound
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Measured:
        d = dict(d)
        for derived in ("flops_bound", "forward_bound"):
            d.pop(derived, None)
        return Measured(Candidate.from_dict(d.pop("candidate")), **{**d, "spread": tuple(d["spread"])})


@dataclass
class TuneResult:
    """The outcome of :func:`mmskip.tune`.

    Attributes:
        best: the fastest candidate whose held-out quality meets the floor (the baseline when none
            does, or none is faster): ``best.configs`` (mmskip configs) and ``best.settings`` (e.g.
            ``num_inference_steps``, the sampler).
        metric / floor: the quality metric and the floor it had to meet.
        measured: every finalist measured on the held-out inputs, the baseline first.
        message: what happened, in one or two sentences (shown by the CLI and the app).
        trials: candidates tried on the calibration inputs; ``seconds``: wall time of the whole tuning.
    """

    best: Candidate
    metric: str
    floor: float
    measured: list[Measured]
    message: str = ""
    trials: int = 0
    seconds: float = 0.0
    target: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def best_measured(self) -> Measured:
        return next(m for m in self.measured if m.candidate.key == self.best.key)

    @property
    def front(self) -> list[Measured]:
        """The held-out Pareto front of speed against quality (baseline included), fastest first."""
        pts = self.measured
        front = [m for m in pts if not any(
            o.speedup >= m.speedup and o.quality[self.metric] >= m.quality[self.metric]
            and (o.speedup > m.speedup or o.quality[self.metric] > m.quality[self.metric]) for o in pts)]
        return sorted(front, key=lambda m: -m.speedup)

    def apply(self, target: Any) -> Any:
        """Apply :attr:`best` to ``target`` (the tuned model or pipeline). Returns what the target's
        apply gives: a handle for a model, or the call arguments (``num_inference_steps``) for a pipeline."""
        from .target import make_target

        return make_target(target).apply(self.best)

    def to_dict(self) -> dict[str, Any]:
        return {"best": self.best.to_dict(), "metric": self.metric, "floor": self.floor,
                "measured": [m.to_dict() for m in self.measured], "front": [m.candidate.label for m in self.front],
                "message": self.message, "trials": self.trials, "seconds": self.seconds, "target": self.target,
                "info": self.info}

    def save(self, folder: str | Path) -> Path:
        """Write ``mmskip_tune.json`` (everything) and the best configs: ``mmskip_config.json`` when there
        is one (``SkipConfig.from_pretrained(folder)``) and ``mmskip_skip_config.json`` with all of them
        (a Skip pipeline's ``from_pretrained(..., skip_config=load_skip_configs(folder))``)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / RESULT_NAME).write_text(json.dumps(self.to_dict(), indent=1, default=str) + "\n")
        if len(self.best.configs) == 1:
            self.best.configs[0].save_pretrained(folder)
        if self.best.configs:  # the pipelines' format (load_skip_configs); files the configs read are copied in
            write_configs(self.best.configs, folder)
        return folder / RESULT_NAME

    @staticmethod
    def load(folder: str | Path) -> TuneResult:
        path = Path(folder)
        path = path / RESULT_NAME if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no tuning result at {path}; write one with result.save(folder)")
        d = json.loads(path.read_text())
        return TuneResult(Candidate.from_dict(d["best"]), d["metric"], d["floor"],
                          [Measured.from_dict(m) for m in d["measured"]], d.get("message", ""), d.get("trials", 0),
                          d.get("seconds", 0.0), d.get("target", ""), d.get("info", {}))

    def table(self) -> str:
        """A Markdown table: every measured candidate, speed beside quality, best and front marked."""
        front = {m.candidate.key for m in self.front}
        extra = sorted({k for m in self.measured for k in m.quality} - {self.metric})
        head = ["", "candidate", "family", f"{self.metric} (held-out)", *extra, "speedup (median, IQR)",
                "FLOPs bound", "forward bound"]
        rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in sorted(self.measured, key=lambda m: -m.speedup):
            mark = "**best**" if m.candidate.key == self.best.key else ("front" if m.candidate.key in front else "")
            q = m.quality.get(self.metric)
            ok = "" if q is None or q >= self.floor else " (below floor)"
            bounds = [f"{b:.2f}x" if b else "-" for b in (m.flops_bound, m.forward_bound)]
            cells = [mark, m.candidate.label, m.candidate.family, f"{_num(q)}{ok}",
                     *[_num(m.quality.get(k)) for k in extra],
                     f"{m.speedup:.2f}x ({m.spread[0]:.2f}-{m.spread[1]:.2f})", *bounds]
            rows.append("| " + " | ".join(cells) + " |")
        return "\n".join(rows)

    def plot(self, path: str | Path | None = None, ax: Any = None) -> Any:
        """Speedup against held-out quality: every finalist by family, the front joined, the floor
        dashed. Draws on ``ax`` when given (one panel of a larger figure), else on a figure of its
        own; saves the figure to ``path`` when given; returns the figure."""
        if ax is None:
            from ..optional_deps import require

            require("matplotlib", "TuneResult.plot()")
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure

            fig = Figure(figsize=(6.4, 4.4))  # no pyplot: no global figure state in a library
            FigureCanvasAgg(fig)
            ax = fig.subplots()
        fig = ax.figure
        families = sorted({m.candidate.family for m in self.measured})
        markers = dict(zip(families, "osD^vP*X<>"))
        for fam in families:
            pts = [m for m in self.measured if m.candidate.family == fam]
            ax.scatter([m.quality[self.metric] for m in pts], [m.speedup for m in pts], label=fam,
                       marker=markers[fam], s=42)
        front = sorted(self.front, key=lambda m: m.quality[self.metric])
        ax.plot([m.quality[self.metric] for m in front], [m.speedup for m in front], "k-", lw=0.8, alpha=0.6,
                label="front")
        b = self.best_measured
        ax.scatter([b.quality[self.metric]], [b.speedup], s=160, facecolors="none", edgecolors="red", label="best")
        ax.axvline(self.floor, ls="--", c="grey", lw=0.8)
        ax.axhline(1.0, ls=":", c="grey", lw=0.8)
        ax.set_xlabel(f"{self.metric} vs. baseline (held-out)")
        ax.set_ylabel("speedup (median of paired runs)")
        ax.set_title(f"{self.target}: tuned at {self.metric} >= {self.floor:g}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


def _num(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)
