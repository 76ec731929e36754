"""Layer skipping in vLLM serving: ``MmskipLlamaForCausalLM``, vLLM's Llama with whole decoder
layers skipped by an ``mmskip.LayerSkipConfig``.

Use::

    LLM(model=..., hf_overrides={"architectures": ["MmskipLlamaForCausalLM"],
                                 "mmskip_layer_skip": mmskip.LayerSkipConfig(...).to_dict()})

Only ``phase="all"`` is served: vLLM packs prompt and generated tokens of many requests into one
flat batch with one attention-metadata object, so a layer cannot run for the prompt tokens and be
skipped for the generated tokens of the same forward without rebuilding that metadata per layer.
With ``phase="all"`` a skipped layer runs for no token, so its KV is never written or read, as on
mmskip's transformers path.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.models.llama import LlamaForCausalLM

__all__ = ["LAYER_SKIP_KEY", "MmskipLlamaForCausalLM", "layer_skip_set"]

LAYER_SKIP_KEY = "mmskip_layer_skip"


def layer_skip_set(settings: Any, num_layers: int) -> tuple[int, ...]:
    """The layers an ``mmskip.LayerSkipConfig`` (as ``to_dict()``, its JSON, or a saved config
    folder) skips in a model of ``num_layers`` layers; refuses anything vLLM cannot serve."""
    from mmskip.inject import SkipConfig
    from mmskip.layer_skip import LayerSkipConfig

    if settings is None:
        raise ValueError(
            "MmskipLlamaForCausalLM needs hf_overrides={'mmskip_layer_skip': LayerSkipConfig(..., phase='all').to_dict()}"
        )
    try:
        config = SkipConfig.from_pretrained(settings) if isinstance(settings, str) and not settings.lstrip().startswith(
            "{") else SkipConfig.from_dict(settings)
    except (FileNotFoundError, ValueError, TypeError) as err:
        raise ValueError(f"mmskip_layer_skip: {err}") from None
    if not isinstance(config, LayerSkipConfig):
        raise ValueError(f"mmskip_layer_skip holds a {type(config).__name__}; vLLM serving takes a LayerSkipConfig")
    if config.phase != "all":
        raise ValueError(
            "mmskip_layer_skip: vLLM serving offers only phase='all' (prompt and generated tokens share one "
            f"batch and one attention metadata per forward), got phase={config.phase!r}"
        )
    ratios = config.schedule.ratios(num_layers)
    skip = tuple(i for i, r in enumerate(ratios) if r < 0.5)
    if len(skip) >= num_layers:
        raise ValueError(f"mmskip_layer_skip skips all {num_layers} layers; keep at least one")
    return skip


def _passthrough(positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                 **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A skipped layer: the residual stream goes on unchanged (vLLM layers carry it as a pair)."""
    return hidden_states, residual


class MmskipLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's Llama whose skipped decoder layers pass the residual stream through (their
    instance ``forward`` is replaced; modules, weights and state-dict keys stay as they are)."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        hf_config = vllm_config.model_config.hf_config
        self.mmskip_skip = layer_skip_set(getattr(hf_config, LAYER_SKIP_KEY, None), len(self.model.layers))
        for i in self.mmskip_skip:
            self.model.layers[i].forward = _passthrough

    def mmskip_kept_fraction(self) -> float:
        """Share of decoder layers that run (the FLOPs bound's decoder part)."""
        return 1.0 - len(self.mmskip_skip) / len(self.model.layers)
