"""Architecture registry: model class -> adapter that knows where layers, attention, MLP and norms are.

Adding a family is one adapter registered here (or from an extension package such as
``mmskip.diffusion``), not edits across techniques. Lookup walks the model's class MRO by
class name, so transformers need not be imported to register a family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["UnsupportedModelError", "register", "register_fallback", "get_adapter", "supported", "DecoderAdapter"]

_REGISTRY: dict[str, tuple[str, Callable[[nn.Module], Any]]] = {}
# kind -> (factory returning an adapter or None, what the fallback accepts, for error messages)
_FALLBACKS: dict[str, tuple[Callable[[nn.Module], Any], str]] = {}


class UnsupportedModelError(TypeError):
    """Raised when no adapter knows the model's class."""

    def __init__(self, model: Any, kind: str | None = None) -> None:
        names = supported(kind)
        what = f"{kind} " if kind else ""
        hints = [h for k, (_, h) in _FALLBACKS.items() if kind is None or k == kind]
        extra = f" ({'; '.join(hints)})" if hints else ""
        super().__init__(
            f"mmskip has no {what}adapter for {type(model).__name__}. Supported {what}model classes: "
            f"{', '.join(names) or '(none)'}{extra}. Register one with mmskip.registry.register()."
        )


def register(*class_names: str, kind: str = "decoder") -> Callable:
    """Decorator: ``@register("LlamaForCausalLM", ...)`` on a factory ``f(model) -> adapter``."""

    def wrap(factory: Callable[[nn.Module], Any]) -> Callable[[nn.Module], Any]:
        for name in class_names:
            _REGISTRY[name] = (kind, factory)
        return factory

    return wrap


def register_fallback(kind: str, factory: Callable[[nn.Module], Any], hint: str) -> None:
    """For models no class name matches: ``factory(model)`` returns an adapter of ``kind`` or None.

    ``hint`` says what the fallback accepts (shown in ``UnsupportedModelError``).
    """
    _FALLBACKS[kind] = (factory, hint)


def supported(kind: str | None = None) -> list[str]:
    """Names of supported model classes (optionally of one adapter kind)."""
    return sorted(n for n, (k, _) in _REGISTRY.items() if kind is None or k == kind)


def get_adapter(model: nn.Module, kind: str | None = None) -> Any:
    """The adapter for ``model`` (walking its MRO), or ``UnsupportedModelError``."""
    for cls in type(model).__mro__:
        entry = _REGISTRY.get(cls.__name__)
        if entry is not None and (kind is None or entry[0] == kind):
            return entry[1](model)
    for k, (factory, _) in _FALLBACKS.items():
        if kind is None or k == kind:
            adapter = factory(model)
            if adapter is not None:
                return adapter
    raise UnsupportedModelError(model, kind)


# -- decoder-only language models ------------------------------------------------------------


@dataclass
class DecoderAdapter:
    """Where things are in a decoder-only LM (transformers). One instance per model."""

    model: nn.Module
    decoder: nn.Module  # the module whose forward runs the layer stack (receives the cache)
    layers: nn.ModuleList
    head: nn.Module | None
    attn_name: str
    mlp_name: str
    mlp_norm_name: str
    gated_mlp: bool = True
    layer_returns_tuple: bool = False
    final_norm: nn.Module | None = None  # the norm between the last layer and the head (early exits use it)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def attention(self, i: int) -> nn.Module:
        return getattr(self.layers[i], self.attn_name)

    def mlp(self, i: int) -> nn.Module:
        return getattr(self.layers[i], self.mlp_name)

    def mlp_norm(self, i: int) -> nn.Module:
        return getattr(self.layers[i], self.mlp_norm_name)

    def layer_index(self, layer: nn.Module) -> int:
        for i, m in enumerate(self.layers):
            if m is layer:
                return i
        raise ValueError("module is not one of this model's decoder layers")

    def skip_output(self, hidden_states: torch.Tensor) -> Any:
        """What a skipped layer returns: its input, in the layer's output format."""
        return (hidden_states,) if self.layer_returns_tuple else hidden_states

    def unit(self, kind: str, i: int) -> nn.Module:
        """Layer ``i``'s skippable unit: ``"layer"``, ``"attn"`` or ``"mlp"``."""
        if kind == "layer":
            return self.layers[i]
        if kind == "attn":
            return self.attention(i)
        if kind == "mlp":
            return self.mlp(i)
        raise ValueError(f"unit kind must be 'layer', 'attn' or 'mlp', got {kind!r}")

    def skipped(self, kind: str, args: tuple, kwargs: dict) -> Any:
        """What a skipped unit returns for a call with ``args`` / ``kwargs``: a layer passes its
        input on; an attention or MLP sublayer adds nothing to the residual stream (zeros).

        The one rule every skipping technique uses (layer skipping, the SWIFT draft, the depth
        analysis), so "skip" means the same thing everywhere."""
        h = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
        if kind == "layer":
            return self.skip_output(h)
        if kind == "attn":
            return torch.zeros_like(h), None
        if kind == "mlp":
            return torch.zeros_like(h)
        raise ValueError(f"unit kind must be 'layer', 'attn' or 'mlp', got {kind!r}")

    # -- FLOPs per token (2 x multiply-adds of the weight matmuls; attention scores excluded) --
    def _linear_flops(self, module: nn.Module) -> float:
        # nn.Linear and GPT-2's Conv1D: one multiply-add per weight per token
        return float(sum(2 * m.weight.numel() for m in module.modules() if type(m).__name__ in ("Linear", "Conv1D")))

    def attn_flops(self, i: int = 0) -> float:
        return self._linear_flops(self.attention(i))

    def mlp_flops(self, i: int = 0) -> float:
        return self._linear_flops(self.mlp(i))

    def layer_flops(self, i: int = 0) -> float:
        return self.attn_flops(i) + self.mlp_flops(i)

    def head_flops(self) -> float:
        return self._linear_flops(self.head) if self.head is not None else 0.0


def _llama_like(model: nn.Module) -> DecoderAdapter:
    base = getattr(model, "model", model)  # *ForCausalLM wraps *Model in .model
    return DecoderAdapter(
        model=model,
        decoder=base,
        layers=base.layers,
        head=getattr(model, "lm_head", None),
        attn_name="self_attn",
        mlp_name="mlp",
        mlp_norm_name="post_attention_layernorm",
        final_norm=getattr(base, "norm", None),
    )


register(
    *[
        f"{family}{suffix}"
        for family in ("Llama", "Mistral", "Qwen2", "Qwen3", "Gemma", "Phi3")
        for suffix in ("ForCausalLM", "Model")
    ],
    "Qwen2VLTextModel",  # the language models inside Qwen2-VL / Qwen2.5-VL
    "Qwen2_5_VLTextModel",
)(_llama_like)


def _gpt2(model: nn.Module) -> DecoderAdapter:
    base = getattr(model, "transformer", model)
    return DecoderAdapter(
        model=model,
        decoder=base,
        layers=base.h,
        head=getattr(model, "lm_head", None),
        attn_name="attn",
        mlp_name="mlp",
        mlp_norm_name="ln_2",
        final_norm=getattr(base, "ln_f", None),
        gated_mlp=False,
    )


register("GPT2LMHeadModel", "GPT2Model")(_gpt2)
