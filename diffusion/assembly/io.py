"""Save and load assembled UNets, with or without ME-CondConv layers."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .condconv import CONDCONV_FILE, insert_condconv, read_condconv_record, write_condconv_record

__all__ = ["save_assembled", "load_assembled"]


def save_assembled(unet: nn.Module, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """``unet.save_pretrained(folder)`` plus, when it holds ME-CondConv layers, where they sit.

    Without ME-CondConv the folder is an ordinary diffusers UNet (``UNet2DConditionModel.from_pretrained``);
    with it, load it with :func:`load_assembled`. ``dtype`` stores the weights in that dtype (e.g.
    ``torch.float16`` for the zoo); the model itself is not changed.
    """
    from .condconv import MECondConv2d

    folder = Path(folder)
    names = [n for n, m in unet.named_modules() if isinstance(m, MECondConv2d)]
    experts = {m.num_experts for m in unet.modules() if isinstance(m, MECondConv2d)}
    if len(experts) > 1:
        raise ValueError(f"ME-CondConv layers with different expert counts {sorted(experts)} cannot be saved together")
    target = unet
    if dtype is not None and dtype != unet.dtype:
        import copy

        target = copy.deepcopy(unet).to(dtype)
    target.save_pretrained(folder, safe_serialization=True)
    record = folder / CONDCONV_FILE
    if names:
        write_condconv_record(folder, names, experts.pop())
    elif record.exists():
        record.unlink()
    return folder


def load_assembled(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An assembled UNet from ``folder`` (a UNet folder, or a pipeline folder with ``unet/``), in ``dtype``."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "config.json").is_file() and (folder / "unet" / "config.json").is_file():
        folder = folder / "unet"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no UNet (config.json); save one with save_assembled(unet, folder)")
    record = read_condconv_record(folder)
    if record is None:
        return UNet2DConditionModel.from_pretrained(folder, torch_dtype=dtype).eval()
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder))
    insert_condconv(unet, record["names"], record["num_experts"])
    weights = {}
    for f in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(str(f)))
    unet.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    return unet.to(dtype).eval()
