"""FiRST's routers: one small MLP per routed layer, and their folder format (safetensors + JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..registry import get_adapter

__all__ = ["Router", "Routers"]

_WEIGHTS = "routers.safetensors"
_META = "routers.json"


class Router(nn.Module):
    """FiRST's router: ``sigmoid(W2 relu(W1 rmsnorm(h)))``, one keep probability per token."""

    def __init__(self, hidden_size: int, width: int = 64, init_keep: float = 0.95) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, width)
        self.fc2 = nn.Linear(width, 1)
        with torch.no_grad():  # start near "keep everything": the base model's behaviour
            self.fc2.weight.mul_(0.01)
            self.fc2.bias.fill_(torch.logit(torch.tensor(init_keep)).item())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(h)))).squeeze(-1)

    def sequence_keep(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean keep probability over each sequence's valid tokens: (batch,)."""
        p = self(h)
        if mask is None:
            return p.mean(-1)
        m = mask.to(p.dtype)
        return (p * m).sum(-1) / m.sum(-1).clamp(min=1.0)


class Routers(nn.Module):
    """The routers of one model: ``routers[str(i)]`` for each routed layer ``i``."""

    def __init__(self, hidden_size: int, num_layers: int, width: int = 64, init_keep: float = 0.95) -> None:
        super().__init__()
        self.hidden_size, self.num_layers, self.width = hidden_size, num_layers, width
        self.routers = nn.ModuleDict({str(i): Router(hidden_size, width, init_keep) for i in range(1, num_layers)})

    @classmethod
    def for_model(cls, model: nn.Module, width: int = 64, init_keep: float = 0.95) -> Routers:
        """Fresh routers sized for ``model`` (on its device)."""
        adapter = get_adapter(model, "decoder")
        hidden = model.config.get_text_config(decoder=True).hidden_size
        ref = next(model.parameters())
        return cls(hidden, adapter.num_layers, width, init_keep).to(device=ref.device)

    def __getitem__(self, i: int) -> Router:
        return self.routers[str(i)]

    @property
    def routed(self) -> list[int]:
        return sorted(int(k) for k in self.routers)

    def save(self, folder: str | Path, **meta: Any) -> Path:
        """Write ``routers.safetensors`` and ``routers.json`` (sizes and ``meta``) into ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / _WEIGHTS))
        info = {"hidden_size": self.hidden_size, "num_layers": self.num_layers, "width": self.width, "meta": meta}
        (folder / _META).write_text(json.dumps(info, indent=1, default=str) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path, map_location: Any = "cpu") -> Routers:
        """Routers written by :meth:`save`."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / _WEIGHTS).is_file() or not (folder / _META).is_file():
            raise FileNotFoundError(
                f"no routers in {str(folder)!r} (expected {_WEIGHTS} and {_META}); train them with "
                "`python -m mmskip.train.first --out FOLDER`"
            )
        info = json.loads((folder / _META).read_text())
        routers = cls(info["hidden_size"], info["num_layers"], info["width"])
        routers.load_state_dict(load_file(str(folder / _WEIGHTS), device=str(map_location)))
        routers.meta = info.get("meta", {})
        return routers.eval()
