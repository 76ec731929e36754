"""Depth-efficiency analysis ("Do Language Models Use Their Depth Efficiently?", Csordás et al., 2025).

For a supported decoder LM and some text:

- **Sublayer contributions**: for every layer, the norm of the attention and of the MLP output
  relative to the residual stream they are added to (``||f(h)|| / ||h||``, averaged over
  tokens), and their cosine similarity with that residual (negative: erasing, ~0: writing new
  directions, positive: amplifying).
- **Layer-skip effects**: skip layer ``i`` (its output is its input) and measure the relative
  change of the residual stream leaving every later layer ``j`` (``||h_j' - h_j|| / ||h_j||``),
  and at the output: KL(full || skipped) of the next-token distributions and top-1 agreement.
- **Void layers** from LAC (``mmskip.analysis.void_layers``).
- **A suggested skip schedule**: layers ranked by their single-skip output effect, added one by
  one while the *joint* skip set keeps top-1 agreement with the full model at or above
  ``min_agreement``; the agreement/KL of every prefix of that ranking is reported as a curve
  (what a layer-skipping draft or static schedule can expect).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.hooks import HookRegistry

from .._skip_unit import SkipUnitHook
from ..registry import DecoderAdapter, get_adapter
from ..schedules import ExplicitSchedule, explicit
from .voids import void_layers

__all__ = ["DepthReport", "depth_report", "sublayer_contributions", "skip_effects", "skip_curve"]


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


def _valid(mask: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    return torch.ones(shape, dtype=torch.bool) if mask is None else mask.bool().cpu()


def _mean(values: torch.Tensor, valid: torch.Tensor) -> float:
    values = values.float().cpu()
    return float(values[valid].mean()) if valid.any() else 0.0


def _positions(mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None:
        return None
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def _forward(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, hidden: bool = False) -> Any:
    return model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False,
                 output_hidden_states=hidden)


_SKIP_HOOK = "mmskip.analysis.skip"


@contextmanager
def _skipping(adapter: DecoderAdapter, indices: set[int] | list[int], kind: str = "layer") -> Iterator[None]:
    """Temporarily skip ``adapter.unit(kind, i)`` for each ``i`` (a layer returns its input, an
    attention / MLP sublayer adds nothing) with the shared :class:`~mmskip._skip_unit.SkipUnitHook`,
    so "skip" here is what it is for every technique. No cache is used by the analysis. The hook
    replaces the unit's forward, so transformers' output-capturing hooks (``hidden_states``) see
    the skip; on exit the modules are exactly as they were."""
    added: list[tuple[torch.nn.Module, bool, bool]] = []
    try:
        for i in indices:
            module = adapter.unit(kind, i)
            had_registry, had_forward = "_diffusers_hook" in module.__dict__, "forward" in module.__dict__
            registry = HookRegistry.check_if_exists_or_initialize(module)
            registry.register_hook(SkipUnitHook(adapter, kind, i, lambda: True), _SKIP_HOOK)
            added.append((module, had_registry, had_forward))
        yield
    finally:
        for module, had_registry, had_forward in reversed(added):
            registry = module._diffusers_hook
            registry.remove_hook(_SKIP_HOOK, recurse=False)
            if not registry.hooks and not had_registry:
                del module._diffusers_hook
                if not had_forward:
                    module.__dict__.pop("forward", None)


@torch.no_grad()
def sublayer_contributions(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> dict[str, list[float]]:
    """Per layer: attention / MLP / whole-layer output norm relative to the residual it is added
    to, and the cosine of each sublayer output with that residual (mean over non-pad tokens)."""
    adapter = get_adapter(model, "decoder")
    L = adapter.num_layers
    valid = _valid(attention_mask, input_ids.shape)
    out: dict[str, list[float]] = {k: [0.0] * L for k in ("attn", "mlp", "layer", "attn_cosine", "mlp_cosine")}
    resid: dict[int, torch.Tensor] = {}
    hooks = []

    def layer_pre(i: int):
        def fn(module, args, kwargs):
            resid[i] = (args[0] if args else kwargs["hidden_states"]).detach()
        return fn

    def layer_post(i: int):
        def fn(module, args, kwargs, output):
            h_in = resid[i]
            delta = _first(output) - h_in
            out["layer"][i] = _mean(delta.norm(dim=-1) / h_in.norm(dim=-1).clamp(min=1e-12), valid)
        return fn

    def attn_post(i: int):
        def fn(module, args, kwargs, output):
            a, h = _first(output), resid[i]
            out["attn"][i] = _mean(a.norm(dim=-1) / h.norm(dim=-1).clamp(min=1e-12), valid)
            out["attn_cosine"][i] = _mean(torch.nn.functional.cosine_similarity(a, h, dim=-1), valid)
        return fn

    def mlp_norm_pre(i: int):
        def fn(module, args, kwargs):
            resid[(i, "mlp")] = (args[0] if args else next(iter(kwargs.values()))).detach()
        return fn

    def mlp_post(i: int):
        def fn(module, args, kwargs, output):
            m, h = _first(output), resid[(i, "mlp")]
            out["mlp"][i] = _mean(m.norm(dim=-1) / h.norm(dim=-1).clamp(min=1e-12), valid)
            out["mlp_cosine"][i] = _mean(torch.nn.functional.cosine_similarity(m, h, dim=-1), valid)
        return fn

    for i in range(L):
        hooks += [
            adapter.layers[i].register_forward_pre_hook(layer_pre(i), with_kwargs=True),
            adapter.layers[i].register_forward_hook(layer_post(i), with_kwargs=True),
            adapter.attention(i).register_forward_hook(attn_post(i), with_kwargs=True),
            adapter.mlp_norm(i).register_forward_pre_hook(mlp_norm_pre(i), with_kwargs=True),
            adapter.mlp(i).register_forward_hook(mlp_post(i), with_kwargs=True),
        ]
    try:
        _forward(model, input_ids, attention_mask)
    finally:
        for h in hooks:
            h.remove()
    return out


def _output_effect(ref_logits: torch.Tensor, logits: torch.Tensor, valid: torch.Tensor) -> tuple[float, float]:
    """(mean KL(full || other), top-1 agreement) over valid positions."""
    logp, logq = ref_logits.float().log_softmax(-1), logits.float().log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    agree = (ref_logits.argmax(-1) == logits.argmax(-1)).float()
    return _mean(kl, valid), _mean(agree, valid)


@torch.no_grad()
def skip_effects(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> dict[str, Any]:
    """Skip each layer alone. ``residual[i][j]``: relative change of the residual stream leaving
    layer ``j`` (0 for ``j < i``, which skipping ``i`` cannot change); ``output_kl[i]`` and
    ``output_agreement[i]``: effect on the next-token distribution and top-1 token. The residual
    leaving the last layer is read after the final norm (what transformers' hidden_states hold).
    ``attn_output_kl`` / ``attn_output_agreement`` and ``mlp_...``: the same output effects when
    only layer ``i``'s attention or MLP sublayer is skipped (the units SWIFT's draft skips)."""
    adapter = get_adapter(model, "decoder")
    L = adapter.num_layers
    valid = _valid(attention_mask, input_ids.shape)
    ref = _forward(model, input_ids, attention_mask, hidden=True)
    ref_h = ref.hidden_states  # L + 1 (embeddings, then each layer; the last may be post-norm)
    residual = [[0.0] * L for _ in range(L)]
    kl, agree = [0.0] * L, [0.0] * L
    for i in range(L):
        with _skipping(adapter, [i]):
            out = _forward(model, input_ids, attention_mask, hidden=True)
        for j in range(i, L):
            a, b = ref_h[j + 1], out.hidden_states[j + 1]
            residual[i][j] = _mean((b - a).norm(dim=-1) / a.norm(dim=-1).clamp(min=1e-12), valid)
        kl[i], agree[i] = _output_effect(ref.logits, out.logits, valid)
    result = {"residual": residual, "output_kl": kl, "output_agreement": agree}
    for kind in ("attn", "mlp"):  # sublayers: what SWIFT's draft skips
        kl_s, agree_s = [0.0] * L, [0.0] * L
        for i in range(L):
            with _skipping(adapter, [i], kind):
                logits = _forward(model, input_ids, attention_mask).logits
            kl_s[i], agree_s[i] = _output_effect(ref.logits, logits, valid)
        result[f"{kind}_output_kl"], result[f"{kind}_output_agreement"] = kl_s, agree_s
    return result


@torch.no_grad()
def skip_curve(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    order: list[int],
) -> list[dict[str, Any]]:
    """Skip the first 1, 2, ... layers of ``order`` jointly; KL and top-1 agreement of each set."""
    adapter = get_adapter(model, "decoder")
    valid = _valid(attention_mask, input_ids.shape)
    ref = _forward(model, input_ids, attention_mask).logits
    curve = []
    for n in range(1, len(order) + 1):
        with _skipping(adapter, order[:n]):
            logits = _forward(model, input_ids, attention_mask).logits
        kl, agree = _output_effect(ref, logits, valid)
        curve.append({"skipped": sorted(order[:n]), "output_kl": kl, "output_agreement": agree})
    return curve


@dataclass
class DepthReport:
    """Everything :func:`depth_report` measured; ``to_json()`` and ``plot(folder)``."""

    model: str
    num_layers: int
    tokens: int
    contributions: dict[str, list[float]]
    skip_effect: dict[str, Any]
    voids: dict[str, Any]
    curve: list[dict[str, Any]]
    min_agreement: float
    suggested_skip: list[int]
    suggested_schedule: dict[str, Any] = field(default_factory=dict)

    def schedule(self) -> ExplicitSchedule:
        """The suggested skip set as an mmskip schedule (for ``LayerSkipConfig``)."""
        return explicit(skip=self.suggested_skip, num=self.num_layers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    def plot(self, folder: str | Path) -> list[Path]:
        """Write contributions.png, skip_effect.png, voids.png and skip_curve.png; return their paths.

        Draws on standalone Agg figures (matplotlib's object-oriented API): pyplot's global
        backend and figure list are left as they are."""
        import numpy as np

        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as e:
            raise ImportError("DepthReport.plot needs matplotlib: pip install 'mmskip[analysis]'") from e

        def subplots(*args: Any, figsize: tuple[float, float], **kwargs: Any) -> tuple[Any, Any]:
            fig = Figure(figsize=figsize)
            FigureCanvasAgg(fig)
            return fig, fig.subplots(*args, **kwargs)

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        L, x = self.num_layers, np.arange(self.num_layers)
        paths = []

        fig, axes = subplots(1, 2, figsize=(11, 3.8))
        c = self.contributions
        axes[0].bar(x - 0.2, c["attn"], 0.4, label="attention")
        axes[0].bar(x + 0.2, c["mlp"], 0.4, label="MLP")
        axes[0].plot(x, c["layer"], "k.-", label="whole layer")
        axes[0].set(xlabel="layer", ylabel="||sublayer out|| / ||residual||", title="relative contribution")
        axes[0].legend()
        axes[1].plot(x, c["attn_cosine"], "o-", label="attention")
        axes[1].plot(x, c["mlp_cosine"], "s-", label="MLP")
        axes[1].axhline(0, color="grey", lw=0.5)
        axes[1].set(xlabel="layer", ylabel="cos(sublayer out, residual)", title="erase (<0) / amplify (>0)")
        axes[1].legend()
        paths.append(_save(fig, folder / "contributions.png"))

        fig, axes = subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [4, 1]})
        eff = np.array(self.skip_effect["residual"], dtype=float)
        eff[np.tril_indices(L, -1)] = np.nan  # row i, column j < i: skipping i cannot change it
        im = axes[0].imshow(eff, cmap="viridis", origin="upper", aspect="auto")
        axes[0].set(xlabel="layer j (later)", ylabel="skipped layer i", title="relative residual change at j")
        fig.colorbar(im, ax=axes[0])
        e = self.skip_effect
        axes[1].plot(e["output_agreement"], x, "ko-", label="layer")
        if "attn_output_agreement" in e:
            axes[1].plot(e["attn_output_agreement"], x, "s--", label="attention only")
            axes[1].plot(e["mlp_output_agreement"], x, "^--", label="MLP only")
        axes[1].invert_yaxis()
        axes[1].set(xlabel="top-1 agreement", title="at the output")
        axes[1].legend(fontsize=7)
        paths.append(_save(fig, folder / "skip_effect.png"))

        fig, ax = subplots(figsize=(6, 3.5))
        ax.bar(x - 0.2, self.voids.get("prompt", [0] * L), 0.4, label="prompt (PP)")
        ax.bar(x + 0.2, self.voids.get("response", [0] * L), 0.4, label="response (RG)")
        ax.set(xlabel="layer", ylabel="void fraction", title=f"LAC void layers (alpha={self.voids.get('alpha')})")
        ax.legend()
        paths.append(_save(fig, folder / "voids.png"))

        fig, ax = subplots(figsize=(6, 3.5))
        n = [len(p["skipped"]) for p in self.curve]
        ax.plot(n, [p["output_agreement"] for p in self.curve], "o-", label="top-1 agreement")
        ax.axhline(self.min_agreement, color="grey", ls="--", lw=0.8)
        ax.set(xlabel="layers skipped (least effect first)", ylabel="top-1 agreement with full model")
        ax2 = ax.twinx()
        ax2.plot(n, [p["output_kl"] for p in self.curve], "r.--", label="KL")
        ax2.set_ylabel("KL(full || skipped)", color="r")
        paths.append(_save(fig, folder / "skip_curve.png"))
        return paths


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


@torch.no_grad()
def depth_report(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    min_agreement: float = 0.9,
    max_skip: float = 0.5,
    void_alpha: float = 0.8,
    void_new_tokens: int = 16,
    void_prompts: int = 4,
) -> DepthReport:
    """Run every depth analysis on ``input_ids`` (a batch of token sequences; left padding
    masked by ``attention_mask``) and suggest a layer-skip schedule (see the module docstring)."""
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be (batch, tokens) with at least 2 tokens, got {tuple(input_ids.shape)}")
    if not 0.0 <= min_agreement <= 1.0 or not 0.0 <= max_skip < 1.0:
        raise ValueError("min_agreement must lie in [0, 1] and max_skip in [0, 1)")
    adapter = get_adapter(model, "decoder")
    L = adapter.num_layers
    contributions = sublayer_contributions(model, input_ids, attention_mask)
    effects = skip_effects(model, input_ids, attention_mask)
    vp = slice(0, void_prompts)
    voids = void_layers(
        model, input_ids[vp], torch.ones_like(input_ids[vp]) if attention_mask is None else attention_mask[vp],
        alpha=void_alpha, max_new_tokens=void_new_tokens, max_skip=max_skip,
    ).to_dict()
    budget = int(max_skip * L)
    order = sorted(range(1, L), key=lambda i: effects["output_kl"][i])[:budget]  # layer 0 always runs
    curve = skip_curve(model, input_ids, attention_mask, order) if order else []
    suggested: list[int] = []
    for point in curve:
        if point["output_agreement"] < min_agreement:
            break
        suggested = point["skipped"]
    valid = _valid(attention_mask, input_ids.shape)
    report = DepthReport(
        model=type(model).__name__, num_layers=L, tokens=int(valid.sum()), contributions=contributions,
        skip_effect=effects, voids=voids, curve=curve, min_agreement=min_agreement, suggested_skip=suggested,
    )
    report.suggested_schedule = report.schedule().to_dict()
    return report
