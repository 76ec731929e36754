"""LoRA adapters through peft, merged back into the weights for inference."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["add_lora", "merge_lora"]


def add_lora(model: nn.Module, rank: int, targets: Sequence[str]) -> nn.Module:
    """``model`` wrapped by peft with rank-``rank`` LoRA on every linear whose name ends with one of
    ``targets`` (those present); only the adapters train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("LoRA training needs peft: pip install 'mmskip[lora]'") from e
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    present = [t for t in targets if t in names]
    if not present:
        raise ValueError(f"none of the LoRA targets {list(targets)} is a linear layer of {type(model).__name__} "
                         f"(its linear layers: {sorted(names)}); set TrainConfig.lora_targets")
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=present, lora_dropout=0.0)
    return get_peft_model(model, cfg)


def merge_lora(model: nn.Module) -> nn.Module:
    """The base model with the adapters folded into its weights (peft's ``merge_and_unload``)."""
    return model.merge_and_unload()
