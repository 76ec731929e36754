"""The ControlNet Relevance Score: what each control position is worth (RelaCtrl).

RelaCtrl (https://arxiv.org/abs/2502.14377) measures, for every control block of a trained
transformer ControlNet, how much generation quality and control effectiveness drop when that
block is skipped at inference. Here both drops are measured on the same prompts, controls and
seeds as the unskipped run (paired), min-max normalised over positions, and combined:
``score = w · quality_drop + (1 − w) · fidelity_drop`` (``w = weight``), so the most relevant
position scores 1 when it is worst on both.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .positions import control_positions, skipped_control

__all__ = ["RelevanceReport", "relevance", "generate_controlled"]

logger = logging.getLogger(__name__)


@dataclass
class RelevanceReport:
    """Per-position relevance of a ControlNet, with the raw measurements behind it.

    ``quality_loss`` / ``fidelity`` hold each position's value with that position skipped;
    ``baseline`` the values with nothing skipped. ``scores`` are the combined relevance in [0, 1].
    """

    positions: list[str]
    indices: list[int]
    quality_loss: list[float]
    fidelity: list[float]
    baseline: dict[str, float]
    weight: float
    scores: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.scores:
            q, f = self.drops()
            self.scores = [self.weight * a + (1 - self.weight) * b for a, b in zip(q, f, strict=True)]

    def drops(self) -> tuple[list[float], list[float]]:
        """The quality and the control drop of skipping each position, each min-max normalised."""
        return (_normalised([v - self.baseline["quality_loss"] for v in self.quality_loss]),
                _normalised([self.baseline["fidelity"] - v for v in self.fidelity]))

    def ranking(self) -> list[str]:
        """Positions from most to least relevant."""
        return [p for _, p in sorted(zip(self.scores, self.positions, strict=True), key=lambda t: -t[0])]

    def least_relevant(self, k: int) -> list[str]:
        """The ``k`` positions whose skipping costs least."""
        return self.ranking()[::-1][:k]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> RelevanceReport:
        return cls(**json.loads(Path(path).read_text()))

    def plot(self, path: str | Path, title: str = "ControlNet Relevance Score") -> Path:
        """A bar chart of the scores with both normalised drops beside them."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        q, f = self.drops()
        x = range(len(self.positions))
        fig, ax = plt.subplots(figsize=(1.1 * len(self.positions) + 2.5, 3.2))
        ax.bar([i - 0.27 for i in x], q, 0.27, label="quality drop (norm.)", color="#9ab")
        ax.bar(list(x), f, 0.27, label="control drop (norm.)", color="#bca")
        ax.bar([i + 0.27 for i in x], self.scores, 0.27, label=f"relevance (w={self.weight:g})", color="#c54")
        ax.set_xticks(list(x), self.positions, rotation=30)
        ax.set_ylabel("normalised over positions")
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return Path(path)


def _normalised(values: Sequence[float]) -> list[float]:
    lo, hi = min(values), max(values)
    if hi - lo <= 1e-12:
        return [0.0 for _ in values]
    return [(v - lo) / (hi - lo) for v in values]


def generate_controlled(pipe: Any, prompts: Sequence[str], controls: torch.Tensor, seed: int = 0,
                        batch_size: int = 50, **call_kwargs: Any) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] from a ControlNet pipeline, seeded per batch. A string
    ``negative_prompt`` is used for every row."""
    out = []
    negative = call_kwargs.pop("negative_prompt", None)
    for i in range(0, len(prompts), batch_size):
        g = torch.Generator().manual_seed(seed + i)
        chunk = list(prompts[i:i + batch_size])
        if isinstance(negative, str):  # one negative prompt for every row
            call_kwargs["negative_prompt"] = [negative] * len(chunk)
        elif negative is not None:
            call_kwargs["negative_prompt"] = list(negative[i:i + batch_size])
        res = pipe(prompt=chunk, control_image=controls[i:i + batch_size], generator=g, output_type="pt",
                   **call_kwargs)
        out.append(res.images.float().cpu())
    return torch.cat(out).clamp(0, 1)


def relevance(pipe: Any, prompts: Sequence[str], controls: torch.Tensor, *,
              quality_loss: Callable[[torch.Tensor], float],
              fidelity: Callable[[torch.Tensor, torch.Tensor], float], weight: float = 0.5, seed: int = 0,
              batch_size: int = 50, progress: bool = True,
              generate: Callable[..., torch.Tensor] = generate_controlled, **call_kwargs: Any) -> RelevanceReport:
    """Score every control position of ``pipe.controlnet`` by skipping it (RelaCtrl's analysis).

    Args:
        pipe: a diffusers ControlNet pipeline (``FluxControlNetPipeline``, ``StableDiffusion3ControlNetPipeline``,
            or one whose ``controlnet`` has ``transformer_blocks`` + ``controlnet_blocks``).
        prompts: the prompts; ``controls`` the matching control images (N, 3, H, W) in [0, 1].
        quality_loss: images -> a loss, lower is better (e.g. FID against held-out images).
        fidelity: (images, controls) -> control effectiveness, higher is better (e.g. mask IoU).
        weight: share of the quality drop in the combined score (the rest is the control drop).
        seed, batch_size: every run uses the same seeds, so the drops are paired.
        generate: ``(pipe, prompts, controls, seed=, batch_size=, **call_kwargs) -> images``.
        call_kwargs: passed to the pipeline (steps, guidance, sizes).

    The ControlNet is restored exactly afterwards.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight is the quality share of the score and must lie in [0, 1], got {weight}")
    if len(prompts) != len(controls):
        raise ValueError(f"{len(prompts)} prompts but {len(controls)} control images; give one control per prompt")
    controlnet = getattr(pipe, "controlnet", None)
    if controlnet is None:
        raise TypeError(f"{type(pipe).__name__} has no controlnet; pass a ControlNet pipeline")
    positions = control_positions(controlnet)

    def measure(label: str) -> tuple[float, float]:
        images = generate(pipe, prompts, controls, seed=seed, batch_size=batch_size, **call_kwargs)
        q, f = float(quality_loss(images)), float(fidelity(images, controls))
        logger.info("relevance %s: quality loss %.4g, fidelity %.4g", label, q, f)
        return q, f

    runs = ["none", *[p.name for p in positions]]
    results = {}
    for label in tqdm(runs, desc="relevance (skip each control block)", disable=not progress):
        if label == "none":
            results[label] = measure(label)
        else:
            with skipped_control(controlnet, [label]):
                results[label] = measure(label)
    base_q, base_f = results["none"]
    return RelevanceReport(positions=[p.name for p in positions], indices=[p.index for p in positions],
                           quality_loss=[results[p.name][0] for p in positions],
                           fidelity=[results[p.name][1] for p in positions],
                           baseline={"quality_loss": base_q, "fidelity": base_f}, weight=weight)
