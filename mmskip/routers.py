"""FiRST: per-layer routers that pick, from the prompt, which layers a sequence skips (Jain et al., 2024).

Every routed layer ``i`` (1..L-1; layer 0 always runs) has a small router, a two-layer MLP on
the RMS-normalised residual stream entering the layer. During prefill the router's per-token
"keep" probabilities are averaged over the prompt's (non-pad) tokens; the layer is skipped when
that mean is below ``threshold``. Decisions are made layer by layer while the prompt flows
through the model (a skipped layer changes what later routers see), and the skip set is then
fixed for the whole decode, prompt and generated tokens alike (FiRST's KV-cache-compatible
rule); a skipped layer's cache entries are copied from the nearest lower kept layer, as in
:mod:`mmskip.layer_skip`. In a batch a layer is skipped only if every sequence's router skips it.

Routers are trained with :mod:`mmskip.train.first` (routers only, optionally with LoRA) and
saved with :meth:`Routers.save` as a folder (``routers.safetensors`` + ``routers.json``);
``RouterConfig(path=folder)`` loads them. ``threshold`` is the
inference-time sparsity/quality knob (training's is the sparsity weight).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers.hooks import ModelHook
from torch import nn

from ._phase import ForwardState
from .inject import SkipConfig, SkipHandle, TechniqueState
from .layer_skip import SkipPlan, attach_layer_skipping
from .registry import get_adapter

__all__ = ["Router", "Routers", "RouterConfig", "RouterState"]

logger = logging.getLogger(__name__)

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


class _Decisions:
    """What the routers decided for the current prompt; read by the layer hooks."""

    def __init__(self) -> None:
        self.keep_prob: dict[int, torch.Tensor] = {}  # layer -> (batch,) mean keep probability
        self.log: list[list[int]] = []  # skip set of every prefill, in call order


class _RouterHook(ModelHook):
    """At prefill, decides whether layer ``i`` runs for this prompt; runs before the layer's skip hook."""

    def __init__(self, index: int, router: Router, plan: SkipPlan, state: ForwardState, config: RouterConfig,
                 budget: int, last: bool, decisions: _Decisions) -> None:
        super().__init__()
        self.index, self.router, self.plan, self.state = index, router, plan, state
        self.threshold, self.budget, self.last, self.decisions = config.threshold, budget, last, decisions

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        if self.state.phase != "prefill":
            return args, kwargs
        h = args[0] if args else kwargs["hidden_states"]
        mask = self.state.attention_mask
        if mask is not None and (mask.dim() != 2 or tuple(mask.shape) != tuple(h.shape[:2])):
            logger.warning(
                "FiRST router of layer %d: attention_mask of shape %s does not match the prompt %s; averaging "
                "keep probabilities over every position, padding included", self.index, tuple(mask.shape),
                tuple(h.shape[:2]),
            )
            mask = None
        with torch.no_grad():
            p = self.router.sequence_keep(h, mask)
        self.decisions.keep_prob[self.index] = p
        if bool((p < self.threshold).all()) and len(self.plan.skip) < self.budget:
            self.plan.skip = self.plan.skip | {self.index}
        if self.last:
            self.decisions.log.append(sorted(self.plan.skip))
        return args, kwargs


@dataclass
class RouterState(TechniqueState):
    """State of an applied :class:`RouterConfig`: the routers, the plan and their decisions.

    ``decisions.log`` lists the skip set of every prefill in call order; ``reset()`` empties it.
    """

    forward: ForwardState
    plan: SkipPlan
    routers: Routers
    decisions: _Decisions = field(default_factory=_Decisions)

    def reset(self) -> None:
        self.decisions.log.clear()
        self.decisions.keep_prob.clear()

    def stats(self) -> dict[str, Any]:
        return {
            "skipped_layers": sorted(self.plan.skip),
            "keep_prob": {i: [float(x) for x in p] for i, p in sorted(self.decisions.keep_prob.items())},
        }


@dataclass(frozen=True)
class RouterConfig(SkipConfig):
    """FiRST layer routing with trained routers.

    Paper: Jain et al., 2024, "FiRST: Finetuning Router-Selective Transformers for
    Input-Adaptive Latency Reduction", https://arxiv.org/abs/2410.12513.

    Args:
        path: a folder written by :meth:`Routers.save` (e.g. by ``python -m mmskip.train.first
            --out FOLDER``); required.
        threshold: a layer is skipped when its router's mean keep probability over the prompt
            is below it (higher: more skipping; the inference-time sparsity/quality knob);
            default 0.5.
        max_skip: cap on the fraction of layers skipped (the lowest layers that ask to skip get
            the budget); default 1.0.
    """

    technique: ClassVar[str] = "first_routers"
    path: str = ""
    threshold: float = 0.5
    max_skip: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"RouterConfig.threshold must lie in [0, 1], got {self.threshold}")
        if not 0.0 <= self.max_skip <= 1.0:
            raise ValueError(f"RouterConfig.max_skip must lie in [0, 1], got {self.max_skip}")

    def load_routers(self) -> Routers:
        if not self.path:
            raise ValueError("RouterConfig needs path= to routers saved by Routers.save / mmskip.train.first")
        return Routers.load(self.path)

    def _attach(self, model: nn.Module, handle: SkipHandle) -> None:
        routers = self.load_routers()
        adapter = get_adapter(model, "decoder")
        L = adapter.num_layers
        hidden = model.config.get_text_config(decoder=True).hidden_size
        if routers.num_layers != L or routers.hidden_size != hidden:
            raise ValueError(
                f"the routers in {self.path!r} were trained for a model with {routers.num_layers} layers and hidden "
                f"size {routers.hidden_size}; {type(model).__name__} has {L} layers and hidden size {hidden}. Train "
                "routers for this model with `python -m mmskip.train.first`."
            )
        ref = next(model.parameters())
        routers = routers.to(ref.device).eval()
        state, plan = attach_layer_skipping(adapter, handle, "all", set(), hooked=range(1, L))

        def reset(s: ForwardState) -> None:  # a new prompt: the routers decide again
            if s.phase == "prefill":
                plan.skip = frozenset()

        state.listeners.append(reset)
        tstate = RouterState(state, plan, routers)
        budget = int(self.max_skip * L)
        routed = routers.routed
        for i in routed:  # registered after the skip hooks, so each router runs before its layer's skip hook
            hook = _RouterHook(i, routers[i], plan, state, self, budget, i == routed[-1], tstate.decisions)
            handle.add_hook(adapter.layers[i], hook, ".router")
        handle.state = tstate
