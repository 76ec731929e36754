"""``DraftSpec``: which of the served model's sublayers the self-speculative draft runs.

The draft is the served model itself with sublayers left out: an early exit after layer E
(LayerSkip: layers E..L-1 skipped, then the model's own final norm and LM head), or a SWIFT layer
set (attention and MLP sublayers skipped independently, as ``mmskip.SelfSpeculativeConfig`` saves
them). vLLM users configure it through ``hf_overrides={"mmskip_draft": {...}}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DraftConfigError

__all__ = ["DRAFT_KEY", "DraftSpec", "DraftConfigError"]

DRAFT_KEY = "mmskip_draft"
_FIELDS = ("exit_layer", "attn_skip", "mlp_skip", "swift_config", "max_drafting_requests", "adaptive",
           "prompt_lookup")
DEFAULT_LOOKUP = (2, 4)  # n-gram lengths tried by ``prompt_lookup: true`` (vLLM's ngram benchmark settings)


@dataclass(frozen=True)
class DraftSpec:
    """The draft's sublayer sets and its drafting policy.

    Args:
        num_layers: decoder layers of the served model.
        attn_skip: layers whose attention the draft skips.
        mlp_skip: layers whose MLP the draft skips.
        max_drafting_requests: drafting turns itself off while more requests than this decode at
            once (the draft runs request by request; under load plain decoding is faster); default 4.
        adaptive: adapt each request's draft length to its acceptance (grow after a fully accepted
            draft, shrink to one past the accepted prefix after a rejection); default True.
        prompt_lookup: ``(min_n, max_n)``: first look the context's last n tokens up in the
            context itself and draft what followed them (no forward pass); the kept layers draft
            only rows without a match. ``None`` (default): the kept layers draft every row.
    """

    num_layers: int
    attn_skip: frozenset[int]
    mlp_skip: frozenset[int]
    max_drafting_requests: int = 4
    adaptive: bool = True
    prompt_lookup: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        bad = sorted(i for i in self.attn_skip | self.mlp_skip if not 0 <= i < self.num_layers)
        if bad:
            raise DraftConfigError(
                f"mmskip_draft skips layers {bad}, but the served model has layers 0..{self.num_layers - 1}"
            )
        if len(self.attn_skip) == self.num_layers and len(self.mlp_skip) == self.num_layers:
            raise DraftConfigError("mmskip_draft skips every sublayer: keep at least one layer (exit_layer >= 1)")
        if not self.attn_skip and not self.mlp_skip:
            raise DraftConfigError(
                "mmskip_draft skips nothing, so the draft is the full model and cannot be faster: "
                "set exit_layer < num_hidden_layers or name attn_skip / mlp_skip layers"
            )
        if self.max_drafting_requests < 1:
            raise DraftConfigError(f"mmskip_draft.max_drafting_requests must be >= 1, got {self.max_drafting_requests}")

    @property
    def kept_attention(self) -> list[int]:
        """Layers whose attention the draft runs (it keeps their KV)."""
        return [i for i in range(self.num_layers) if i not in self.attn_skip]

    @property
    def last_layer(self) -> int:
        """One past the deepest layer with a kept sublayer (the early-exit point)."""
        return 1 + max(i for i in range(self.num_layers) if i not in self.attn_skip or i not in self.mlp_skip)

    def kept_fraction(self) -> float:
        """Share of the decoder's sublayers the draft runs (attention and MLP counted alike)."""
        return 1.0 - (len(self.attn_skip) + len(self.mlp_skip)) / (2 * self.num_layers)

    def describe(self) -> str:
        """One line for logs and reports."""
        if self.attn_skip == self.mlp_skip == frozenset(range(self.last_layer, self.num_layers)):
            kind = f"early exit after layer {self.last_layer} of {self.num_layers}"
        else:
            kind = f"SWIFT set: attention skipped {sorted(self.attn_skip)}, MLP skipped {sorted(self.mlp_skip)}"
        if self.prompt_lookup is None:
            return kind
        return f"prompt lookup ({self.prompt_lookup[0]}-{self.prompt_lookup[1]}-grams), else {kind}"

    @classmethod
    def from_settings(cls, settings: Any, num_layers: int) -> DraftSpec:
        """Build from the ``mmskip_draft`` dict (exactly one of ``exit_layer``, ``attn_skip`` /
        ``mlp_skip``, ``swift_config``)."""
        if settings is None:
            raise DraftConfigError(
                "mmskip self-speculation needs a draft: pass hf_overrides={'mmskip_draft': {'exit_layer': E}} "
                "(LayerSkip early exit) or {'mmskip_draft': {'swift_config': '<folder or mmskip_config.json>'}}"
            )
        if not isinstance(settings, dict):
            raise DraftConfigError(f"mmskip_draft must be a dict, got {type(settings).__name__}: {settings!r}")
        unknown = sorted(set(settings) - set(_FIELDS))
        if unknown:
            raise DraftConfigError(f"mmskip_draft has no setting(s) {unknown}; its settings are {list(_FIELDS)}")
        chosen = [k for k in ("exit_layer", "swift_config") if k in settings]
        if "attn_skip" in settings or "mlp_skip" in settings:
            chosen.append("attn_skip/mlp_skip")
        if len(chosen) != 1:
            raise DraftConfigError(
                f"mmskip_draft takes exactly one of exit_layer, attn_skip/mlp_skip, swift_config; got {chosen or 'none'}"
            )
        policy = {k: settings[k] for k in ("max_drafting_requests", "adaptive") if k in settings}
        if "prompt_lookup" in settings:
            policy["prompt_lookup"] = _lookup(settings["prompt_lookup"])
        if "max_drafting_requests" in policy and not _is_int(policy["max_drafting_requests"]):
            raise DraftConfigError(
                f"mmskip_draft.max_drafting_requests must be an int >= 1, got {policy['max_drafting_requests']!r}"
            )
        if not isinstance(policy.get("adaptive", True), bool):
            raise DraftConfigError(f"mmskip_draft.adaptive must be true or false, got {policy['adaptive']!r}")
        if "exit_layer" in settings:
            e = settings["exit_layer"]
            if not _is_int(e) or not 1 <= e < num_layers:
                raise DraftConfigError(
                    f"mmskip_draft.exit_layer must be an int in 1..{num_layers - 1} (the served model has "
                    f"{num_layers} layers), got {e!r}"
                )
            rest = frozenset(range(e, num_layers))
            return cls(num_layers, rest, rest, **policy)
        if "swift_config" in settings:
            attn, mlp = _swift_sets(settings["swift_config"])
        else:
            attn, mlp = settings.get("attn_skip", ()), settings.get("mlp_skip", ())
        return cls(num_layers, _layer_set(attn, "attn_skip"), _layer_set(mlp, "mlp_skip"), **policy)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _lookup(value: Any) -> tuple[int, int] | None:
    """``true`` -> the default n-gram lengths, ``false`` -> off, ``[min_n, max_n]`` as given."""
    if isinstance(value, bool):
        return DEFAULT_LOOKUP if value else None
    if (isinstance(value, list | tuple) and len(value) == 2 and all(_is_int(n) for n in value)
            and 1 <= value[0] <= value[1]):
        return int(value[0]), int(value[1])
    raise DraftConfigError(
        f"mmskip_draft.prompt_lookup must be true, false or [min_n, max_n] with 1 <= min_n <= max_n, got {value!r}"
    )


def _layer_set(value: Any, name: str) -> frozenset[int]:
    if not isinstance(value, list | tuple) or not all(_is_int(i) for i in value):
        raise DraftConfigError(f"mmskip_draft.{name} must be a list of layer indices, got {value!r}")
    return frozenset(value)


def _swift_sets(path: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The fixed layer set of a saved ``mmskip.SelfSpeculativeConfig`` (search once with mmskip's
    transformers path, then ``SelfSpeculativeConfig(attn_skip=..., mlp_skip=...).save_pretrained``)."""
    from mmskip.inject import SkipConfig
    from mmskip.swift import SelfSpeculativeConfig

    try:
        config = SkipConfig.from_pretrained(Path(str(path)))
    except (FileNotFoundError, ValueError, TypeError) as err:
        raise DraftConfigError(f"mmskip_draft.swift_config: {err}") from None
    if not isinstance(config, SelfSpeculativeConfig):
        raise DraftConfigError(f"mmskip_draft.swift_config {path} holds a {type(config).__name__}, not a SelfSpeculativeConfig")
    if config.attn_skip is None and config.mlp_skip is None:
        raise DraftConfigError(
            f"mmskip_draft.swift_config {path} has no fixed layer set (attn_skip / mlp_skip); vLLM serves a set "
            "searched beforehand: save SelfSpeculativeConfig(attn_skip=..., mlp_skip=...) from handle.stats()['layer_set']"
        )
    return tuple(config.attn_skip or ()), tuple(config.mlp_skip or ())
