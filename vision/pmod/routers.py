"""p-MoD's routers: one zero-initialised ``Linear(hidden, 1)`` per MoD layer, saved as a folder.

``MoDRouters.save(folder)`` writes ``mod_routers.safetensors`` and ``mod_routers.json`` (the
routed layers and the language model's shape, so routers of another model are refused with a
clear error); ``MoDConfig(signal="router", routers=folder)`` loads them. Training lives in
:mod:`mmskip.vision.pmod.train`: it builds ``MoDRouters.for_model(model, config)``, optimises
its parameters (read live by the applied hooks through ``handle.state.routers``) and saves them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["MoDRouters"]

logger = logging.getLogger(__name__)

WEIGHTS = "mod_routers.safetensors"
META = "mod_routers.json"


def model_signature(model: nn.Module) -> dict[str, Any]:
    """The language-model shape a set of routers is tied to."""
    text = model.config.get_text_config(decoder=True)
    return {
        "model_class": type(model).__name__,
        "text_model_type": getattr(text, "model_type", ""),
        "hidden_size": int(text.hidden_size),
        "num_layers": int(text.num_hidden_layers),
        "vocab_size": int(getattr(text, "vocab_size", 0) or 0),
    }


class MoDRouters(nn.Module):
    """The routers of one model: ``routers[str(l)]`` (a ``Linear(hidden, 1)``) per MoD layer ``l``.

    Zero-initialised as in p-MoD, so fresh routers score every token 0 and TanhNorm weights
    ``w = 0.2 * tanh(score) + 1`` start at exactly 1 (the base model's residual stream).
    """

    def __init__(self, hidden_size: int, layers: list[int] | tuple[int, ...], signature: dict[str, Any] | None = None):
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.signature = dict(signature or {})
        self.routers = nn.ModuleDict()
        for layer in sorted(set(int(x) for x in layers)):
            lin = nn.Linear(self.hidden_size, 1)
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
            self.routers[str(layer)] = lin
        self.meta: dict[str, Any] = {}

    @classmethod
    def for_model(cls, model: nn.Module, config: Any = None, layers: list[int] | None = None) -> MoDRouters:
        """Fresh (zero) routers for ``model``'s MoD layers: those of ``config`` (a ``MoDConfig``,
        default ``MoDConfig()``) unless ``layers`` are given. On the model's device and dtype."""
        from .config import MoDConfig, mod_layers

        if layers is None:
            from mmskip.registry import get_adapter

            adapter = get_adapter(model, "vlm")
            layers = sorted(mod_layers(config or MoDConfig(), adapter.num_layers, type(model).__name__))
        sig = model_signature(model)
        ref = next(model.parameters())
        return cls(sig["hidden_size"], layers, sig).to(device=ref.device, dtype=ref.dtype)

    @property
    def layers(self) -> list[int]:
        return sorted(int(k) for k in self.routers)

    def score(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Router logits of layer ``layer`` for ``hidden`` (batch, seq, hidden): (batch, seq), float32."""
        lin = self.routers[str(layer)]
        return lin(hidden.to(lin.weight.dtype)).squeeze(-1).float()

    def check(self, model: nn.Module, layers: list[int]) -> None:
        """Raise ``ValueError`` unless these routers fit ``model`` and cover every MoD layer."""
        sig = model_signature(model)
        if self.signature:
            keys = ("text_model_type", "hidden_size", "num_layers", "vocab_size")
            diff = [f"{k}: routers {self.signature.get(k)!r}, model {sig[k]!r}" for k in keys if self.signature.get(k) != sig[k]]
            if diff:
                raise ValueError(
                    f"these p-MoD routers were trained for another model ({'; '.join(diff)}); train routers for "
                    f"this {type(model).__name__} or pass the folder that belongs to it"
                )
        elif self.hidden_size != sig["hidden_size"]:
            raise ValueError(
                f"these p-MoD routers expect hidden size {self.hidden_size}, the model has {sig['hidden_size']}"
            )
        missing = sorted(set(layers) - set(self.layers))
        if missing:
            raise ValueError(
                f"the routers have no router for MoD layer(s) {missing} (they cover {self.layers}); use the schedule "
                "they were trained with, or train routers for this schedule"
            )

    def save(self, folder: str | Path, **meta: Any) -> Path:
        """Write ``mod_routers.safetensors`` and ``mod_routers.json`` into ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS))
        info = {"hidden_size": self.hidden_size, "layers": self.layers, "signature": self.signature, "meta": meta}
        (folder / META).write_text(json.dumps(info, indent=1, default=str) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path, map_location: Any = "cpu") -> MoDRouters:
        """Routers written by :meth:`save`."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / WEIGHTS).is_file() or not (folder / META).is_file():
            raise FileNotFoundError(
                f"no p-MoD routers in {str(folder)!r} (expected {WEIGHTS} and {META}, written by MoDRouters.save)"
            )
        info = json.loads((folder / META).read_text())
        routers = cls(info["hidden_size"], info["layers"], info.get("signature"))
        routers.load_state_dict(load_file(str(folder / WEIGHTS), device=str(map_location)))
        routers.meta = info.get("meta", {})
        return routers.eval()
