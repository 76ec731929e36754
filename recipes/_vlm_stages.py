"""The two training stages the zoo VLM recipes (``digits-llava``, ``digits-video``) share.

Real VLMs start from a pretrained vision encoder; these start from scratch, so a training-only linear
probe on the projector's output gives the vision side a digit signal. Stage 1 (vision warm-up) trains
the vision tower and projector alone on the probe's loss; stage 2 trains the whole model on the
answer tokens plus ``aux`` × the probe's loss. Each stage is one :func:`mmskip.train.fit`. A recipe
subclasses :class:`StageTask` with how its model encodes pixels and scores answers.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from mmskip.train import TrainConfig, TrainTask

__all__ = ["StageTask", "decay_groups", "spread_loss"]


def decay_groups(named: list[tuple[str, torch.Tensor]], weight_decay: float) -> list[dict]:
    """AdamW groups of the VLM recipes: ``weight_decay`` on matrices except embeddings, none elsewhere."""
    decay = [p for n, p in named if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in named if not (p.dim() >= 2 and "embed" not in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def spread_loss(weights: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The VLM recipes' training-only attention loss: ``KL(even spread over the targets || attention)``,
    0 only when the attention ``weights`` ``(..., H, T)`` (over ``T`` vision tokens) spread evenly over the
    ``targets`` ``(..., T)`` (booleans; a row with none adds 0), averaged over every row and head."""
    t = targets[..., None, :].to(weights.dtype)
    k = t.sum(-1).clamp_min(1)
    return (-(weights.float().clamp_min(1e-6).log() * t).sum(-1) / k - k.log()).mean()


class StageTask(TrainTask):
    """One stage: the probe's loss alone on the vision tower + projector (``vision_only``), or the
    answer-token loss plus ``aux`` × the probe's loss on the whole model.

    ``draw(step)`` gives the step's batch, a list of tensors: ``[pixels, patch_labels]`` in the vision
    stage, ``[pixels, input_ids, attention_mask, labels, patch_labels, *extra]`` in the whole-model stage. A
    ``draw`` seeded by the step makes the stage resumable (``fit(..., out, resume=True)``).
    ``evaluate_fn`` (optional) gives held-out numbers, printed and kept in the fit's history. An
    ``answer_loss`` may put further training-only terms in ``extra_terms``; the step adds them.
    ``attn > 0``: the weight of the recipe's attention loss, which reads attention weights, so the model
    runs the eager attention kernel during the stage (its own kernel is back afterwards)."""

    def __init__(self, model: torch.nn.Module, probe: torch.nn.Module, draw: Callable[[int], list[torch.Tensor]],
                 aux: float, steps: int, vision_only: bool, name: str, seed: int = 0,
                 evaluate_fn: Callable[[], dict[str, float]] | None = None, attn: float = 0.0) -> None:
        self.model, self.probe, self.draw, self.aux, self.attn = model, probe, draw, aux, attn
        self.steps, self.vision_only, self.seed, self.evaluate_fn = steps, vision_only, seed, evaluate_fn
        self.every = max(1, steps // (10 if vision_only else 20))
        self.desc = f"{name} vision warm-up" if vision_only else name
        self.captured: dict[str, torch.Tensor] = {}
        self.extra_terms: dict[str, torch.Tensor] = {}
        self.curve: list[tuple[int, float]] = []
        self.hook: Any = None
        self.attn_implementation: str | None = None  # the model's kernel before an ``attn`` stage switched it

    @abstractmethod
    def encode(self, pixels: torch.Tensor) -> None:
        """Run the vision tower and projector on ``pixels`` (the projector's hook captures the output)."""

    @abstractmethod
    def answer_loss(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                    *extra: torch.Tensor) -> torch.Tensor:
        """The language-model loss of a question batch (the projector's hook captures its vision tokens);
        ``extra``: the batch's tensors after its patch labels, if its ``draw`` gives any."""

    @abstractmethod
    def probe_loss(self, feats: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """The probe's loss on the projector's output ``feats`` against the batch's patch labels."""

    def weights(self) -> dict[str, torch.Tensor]:
        named = dict(self.model.named_parameters())
        if self.vision_only:
            inner = self.model.model
            ids = {id(p) for m in (inner.vision_tower, inner.multi_modal_projector) for p in m.parameters()}
            named = {n: p for n, p in named.items() if id(p) in ids}
        return named | {f"probe.{n}": p for n, p in self.probe.named_parameters()}

    def param_groups(self, config: TrainConfig) -> list[dict]:
        return decay_groups(list(self.weights().items()), config.weight_decay)

    def fingerprint(self) -> dict[str, Any]:
        return {"recipe": self.desc, "seed": self.seed, "vision_only": self.vision_only} | (
            {"attn": self.attn} if self.attn else {})

    def state(self) -> dict[str, Any]:
        return {"curve": self.curve}

    def load_state(self, state: dict[str, Any]) -> None:
        self.curve = [tuple(c) for c in state.get("curve", [])]

    @contextmanager
    def hooked(self) -> Iterator[None]:
        """A context in which the projector's output lands in ``captured`` (for the probe)."""
        hook = self.model.model.multi_modal_projector.register_forward_hook(
            lambda mod, args, output: self.captured.__setitem__("feats", output))
        try:
            yield
        finally:
            hook.remove()

    def prepare(self, accelerator: Any) -> None:
        self.device = accelerator.device
        self.model.to(self.device).train()
        self.probe.to(self.device)
        if self.attn:  # only the eager kernel returns attention weights
            self.attn_implementation = self.model.config._attn_implementation
            self.model.set_attn_implementation("eager")
        self.hook = self.hooked()
        self.hook.__enter__()

    def batch(self, step: int) -> list[torch.Tensor]:
        return self.draw(step)

    def loss(self, b: list[torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        b = [x.to(self.device, non_blocking=True) for x in b]
        if self.vision_only:
            pixels, cells = b
            self.encode(pixels)
            terms = {"probe": self.probe_loss(self.captured["feats"], cells)}
        else:
            pixels, ids, mask, labels, cells, *extra = b
            terms = {"lm": self.answer_loss(pixels, ids, mask, labels, *extra)}
            if self.aux:
                terms["probe"] = self.aux * self.probe_loss(self.captured["feats"], cells)
            terms.update(self.extra_terms)
            self.extra_terms = {}
        self.last = next(iter(terms.values())).detach()
        return terms

    def after_step(self, step: int) -> None:
        if step % self.every == 0 or step == self.steps - 1:
            self.curve.append((step + 1, round(self.last.item(), 4)))

    def evaluate(self, step: int) -> dict[str, float]:
        if self.evaluate_fn is None:
            return {}
        scores = self.evaluate_fn()
        print(f"{self.desc} step {step}: {scores}", flush=True)
        return scores

    def finish(self) -> None:
        if self.hook is not None:
            self.hook.__exit__(None, None, None)
            self.hook = None
        if self.attn_implementation is not None:
            self.model.set_attn_implementation(self.attn_implementation)
            self.attn_implementation = None
