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

from .config_check import LAYER_SKIP_KEY, layer_skip_set

__all__ = ["LAYER_SKIP_KEY", "MmskipLlamaForCausalLM", "layer_skip_set"]


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
