"""LoRA adapters (peft) for p-MoD router training: injected into a VLM's language model in place,
saved beside the routers (``lora.safetensors`` + ``lora.json``), merged back into a plain copy.
Used by :mod:`mmskip.vision.pmod.train`."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmskip.registry import get_adapter

__all__ = ["LORA_WEIGHTS", "LORA_META", "default_lora_config", "merged_with_lora"]

LORA_WEIGHTS = "lora.safetensors"
LORA_META = "lora.json"


def _peft() -> Any:
    try:
        import peft
    except ModuleNotFoundError as e:
        from mmskip.optional_deps import missing_extra

        err = missing_extra(e, "training p-MoD routers with LoRA")
        if err is None:
            raise
        raise err from e
    return peft


def default_lora_config(model: nn.Module, r: int = 8, alpha: int = 16) -> Any:
    """peft ``LoraConfig`` for the q and v projections of ``model``'s language model (every decoder
    layer; the vision tower and projector are left alone). Targets are full module names."""
    names = {id(m): n for n, m in model.named_modules()}
    text = get_adapter(model, "vlm").text
    targets = []
    for i in range(text.num_layers):
        attn = text.attention(i)
        targets += [names[id(getattr(attn, p))] for p in ("q_proj", "v_proj") if hasattr(attn, p)]
    return _peft().LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=targets)


def _inject_lora(model: nn.Module, lora_config: Any) -> list[tuple[nn.Module, str, nn.Module]]:
    """Put LoRA layers into ``model`` in place (``peft.inject_adapter_in_model``); returns
    ``(parent, attribute, lora layer)`` per wrapped module, for :func:`_unwrap_lora`."""
    peft = _peft()
    from peft.tuners.lora import LoraLayer

    had = set(vars(model))
    peft.inject_adapter_in_model(lora_config, model)
    for key in set(vars(model)) - had:  # peft notes its config on the model (peft_config): not ours to keep
        delattr(model, key)
    found = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and hasattr(module, "base_layer"):
            parent_name, _, attr = name.rpartition(".")
            found.append((model.get_submodule(parent_name) if parent_name else model, attr, module))
    if not found:
        raise ValueError(f"the LoRA config's target_modules {lora_config.target_modules!r} match no module of the model")
    return found


def _unwrap_lora(layers: list[tuple[nn.Module, str, nn.Module]], merge: bool = False) -> None:
    """Put every wrapped module back (``merge``: with the LoRA update added to its weight first)."""
    for parent, attr, module in layers:
        if merge:
            module.merge()
        setattr(parent, attr, module.base_layer)


def _lora_params(layers: list[tuple[nn.Module, str, nn.Module]]) -> list[nn.Parameter]:
    return [p for _, _, m in layers for n, p in m.named_parameters() if "lora_" in n]


def _lora_named(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def merged_with_lora(model: nn.Module, folder: str | Path) -> nn.Module:
    """A copy of ``model`` with the LoRA adapters saved in ``folder`` (``lora.safetensors`` and
    ``lora.json``, written by :func:`train_mod_routers` with ``lora=``) merged into its weights: a plain
    model of the same class (``mmskip.apply`` works on it). ``model`` itself is not changed."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / LORA_WEIGHTS).is_file() or not (folder / LORA_META).is_file():
        raise FileNotFoundError(f"no LoRA adapters in {str(folder)!r} (expected {LORA_WEIGHTS} and {LORA_META})")
    info = json.loads((folder / LORA_META).read_text())
    merged = copy.deepcopy(model)
    cfg = _peft().LoraConfig(r=info["r"], lora_alpha=info["lora_alpha"], lora_dropout=0.0, bias="none",
                             target_modules=info["target_modules"])
    layers = _inject_lora(merged, cfg)
    ref = next(model.parameters())
    state = {k: v.to(device=ref.device, dtype=ref.dtype) for k, v in load_file(str(folder / LORA_WEIGHTS)).items()}
    missing = set(_lora_named(merged)) ^ set(state)
    if missing:
        raise ValueError(f"the LoRA weights in {str(folder)!r} do not fit this model: {sorted(missing)[:4]} ...")
    merged.load_state_dict(state, strict=False)
    with torch.no_grad():
        _unwrap_lora(layers, merge=True)
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged.eval()
