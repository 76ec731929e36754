"""Attaching SWIFT: check the model, hook the draft's candidate sublayers, route ``generate``.

The hooks themselves are the shared :class:`mmskip._skip_unit.SkipUnitHook` on the draft's
units (:mod:`.draft`) and the ``generate`` binding (:mod:`.route`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..inject import SkipHandle
from ..registry import get_adapter
from .draft import Draft
from .route import route_generate
from .state import SwiftState

if TYPE_CHECKING:
    from .config import SelfSpeculativeConfig

__all__ = ["attach_swift"]


def attach_swift(config: SelfSpeculativeConfig, model: torch.nn.Module, handle: SkipHandle) -> None:
    """What :meth:`SelfSpeculativeConfig._attach` does: validate the layer set against the model,
    register FLOPs costs, build the draft and the state, and bind ``model.generate`` to the loop."""
    adapter = get_adapter(model, "decoder")
    if not callable(getattr(model, "generate", None)) or adapter.head is None:
        raise TypeError(
            f"SelfSpeculativeConfig decodes through model.generate; {type(model).__name__} has no LM head or "
            "generate. Apply it to the causal-LM class (e.g. LlamaForCausalLM, not LlamaModel)."
        )
    L = adapter.num_layers
    anchors = _anchor_layers(model, L)
    if config.fixed:
        attn, mlp = set(config.attn_skip or ()), set(config.mlp_skip or ())
        bad = sorted(i for i in attn | mlp if not 0 <= i < L)
        if bad:
            raise ValueError(f"SelfSpeculativeConfig skips layers {bad}, but the model has {L} layers (0..{L - 1})")
        if attn & anchors:
            what = "layer 0's attention" if anchors == {0} else f"the attention of layers {sorted(anchors)}"
            raise ValueError(f"the draft must run {what}: the attention mask is sized from its KV length")
    elif L < 3:
        raise ValueError(f"SWIFT searches layers 1..L-2; a {L}-layer model has none to skip")
    handle.counts.cost.update({f"attn.{i}": adapter.attn_flops(i) for i in range(L)})
    handle.counts.cost.update({f"mlp.{i}": adapter.mlp_flops(i) for i in range(L)})
    handle.counts.fixed_cost = adapter.head_flops()
    if config.fixed:
        units: list[tuple[str, int]] = []
        hooked = set(config.attn_skip or ()) | set(config.mlp_skip or ())
    else:
        units = [(kind, i) for i in range(1, L - 1) for kind in ("attn", "mlp") if not (kind == "attn" and i in anchors)]
        hooked = set(range(1, L - 1))
    state = SwiftState(config, adapter, handle, units, Draft(adapter, handle, hooked))
    handle.state = state
    route_generate(model, handle)


def _anchor_layers(model: torch.nn.Module, num_layers: int) -> set[int]:
    """Layers whose attention the draft always runs: the first layer of each attention type
    (transformers sizes each type's attention mask from that layer's cache)."""
    types = getattr(getattr(model, "config", None), "layer_types", None)
    if not types or len(types) != num_layers:
        return {0}
    return {list(types).index(t) for t in set(types)}
