"""Void-layer report: which layers LAC finds unactivated during the prompt and the response."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..inject import applied
from ..schedules import adaptive
from ..void_layers import VoidLayerConfig, VoidRecord, lac_voids, void_skip_set


@dataclass
class VoidReport:
    """Per-layer void fractions for prompt processing (PP) and response generation (RG)."""

    alpha: float
    prompt: list[float]  # fraction of (non-pad) prompt tokens for which each layer is void
    response: list[float]  # same over generated tokens
    suggested_skip: list[int]  # what VoidLayerConfig(min_void_fraction) would skip for these prompts

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def void_layers(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    alpha: float = 0.5,
    max_new_tokens: int = 16,
    min_void_fraction: float = 0.5,
    max_skip: float = 0.25,
    lift_layers: int = 1,
) -> VoidReport:
    """Trace LAC voids while ``model`` greedily generates ``max_new_tokens`` after the prompts.

    Arguments as in :class:`~mmskip.void_layers.VoidLayerConfig`.
    """
    # max_skip=0: trace only, so the response's norms are the full model's
    config = VoidLayerConfig(schedule=adaptive(alpha, "l2_change", max_skip=0.0), min_void_fraction=min_void_fraction,
                             lift_layers=lift_layers, trace_decode=True)
    with applied(model, config) as handle:
        model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False
        )
        records = list(handle.state.records)
    prompt = [r for r in records if r.phase == "prefill"][0]
    L = prompt.norms.shape[0] - 1
    pp = _fractions([prompt], alpha, lift_layers)
    decode = [r for r in records if r.phase == "decode"]
    rg = _fractions(decode, alpha, lift_layers) if decode else [0.0] * L
    suggested = void_skip_set(prompt, alpha, lift_layers, min_void_fraction, int(max_skip * L))
    return VoidReport(alpha=alpha, prompt=pp, response=rg, suggested_skip=sorted(suggested))


def _fractions(records: list[VoidRecord], alpha: float, lift_layers: int) -> list[float]:
    void = sum((lac_voids(r.norms, alpha, lift_layers) & r.valid).flatten(1).sum(1).float() for r in records)
    total = sum(float(r.valid.sum()) for r in records)
    return [float(v) / max(total, 1.0) for v in void]
