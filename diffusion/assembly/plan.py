"""What model assembly may remove from a ``UNet2DConditionModel``, and the lighter UNet it yields.

Every edit is one a diffusers config can express, so the assembled model is a normal
``UNet2DConditionModel`` (``save_pretrained`` / ``from_pretrained``, any diffusers pipeline):

* ``mid``: the mid block (``mid_block_type=None``, as BK-SDM's base model does);
* ``down_attn.i`` / ``up_attn.j``: every cross-attention transformer of down / up block i / j
  (``CrossAttnDownBlock2D`` -> ``DownBlock2D``, ``CrossAttnUpBlock2D`` -> ``UpBlock2D``);
* ``depth.i``: the last transformer layer of block i's transformers (``transformer_layers_per_block``).

Each edit removes residual units only (output = input + contribution), so bypassing them in the
teacher (:mod:`.importance`) is exactly the assembled model with the teacher's weights, and
the student starts from the teacher's remaining weights (:func:`assemble_unet`).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Edit", "candidate_edits", "assembled_config", "assemble_unet"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Edit:
    """One removable part: its ``name`` and the teacher modules it removes (bypassed to measure it)."""

    name: str
    modules: tuple[str, ...]


def _check_unet(unet: nn.Module) -> None:
    from diffusers import UNet2DConditionModel

    if not isinstance(unet, UNet2DConditionModel):
        raise TypeError(
            f"model assembly rebuilds a diffusers UNet2DConditionModel from its config; got {type(unet).__name__}"
        )


def _depths(unet: nn.Module) -> list[int]:
    d = unet.config.transformer_layers_per_block
    return list(d) if isinstance(d, (list, tuple)) else [d] * len(unet.config.down_block_types)


def candidate_edits(unet: nn.Module) -> list[Edit]:
    """The edits this UNet admits (see the module docstring), in a fixed order."""
    _check_unet(unet)
    edits = []
    if unet.mid_block is not None:
        edits.append(Edit("mid", ("mid_block",)))
    for kind, blocks in (("down", unet.down_blocks), ("up", unet.up_blocks)):
        for i, block in enumerate(blocks):
            attns = getattr(block, "attentions", None)
            if attns:
                edits.append(Edit(f"{kind}_attn.{i}", tuple(f"{kind}_blocks.{i}.attentions.{j}" for j in range(len(attns)))))
    for i, depth in enumerate(_depths(unet)):
        if depth >= 2 and getattr(unet.down_blocks[i], "attentions", None):
            mods = tuple(f"down_blocks.{i}.attentions.{j}.transformer_blocks.{depth - 1}"
                         for j in range(len(unet.down_blocks[i].attentions)))
            up = len(unet.up_blocks) - 1 - i
            mods += tuple(f"up_blocks.{up}.attentions.{j}.transformer_blocks.{depth - 1}"
                          for j in range(len(getattr(unet.up_blocks[up], "attentions", None) or [])))
            mid = getattr(unet.mid_block, "attentions", None) or []
            if i == len(unet.down_blocks) - 1:  # diffusers gives the mid block the last block's depth
                mods += tuple(f"mid_block.attentions.{j}.transformer_blocks.{depth - 1}" for j in range(len(mid)))
            edits.append(Edit(f"depth.{i}", mods))
    return edits


def assembled_config(unet: nn.Module, edits: list[str]) -> dict:
    """The teacher's config with ``edits`` (names from :func:`candidate_edits`) applied."""
    _check_unet(unet)
    known = {e.name for e in candidate_edits(unet)}
    unknown = [e for e in edits if e not in known]
    if unknown:
        raise ValueError(f"unknown or inapplicable edits {unknown}; this UNet admits {sorted(known)}")
    cfg = {k: copy.deepcopy(v) for k, v in unet.config.items() if not k.startswith("_")}
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    depths = _depths(unet)
    for name in edits:
        kind, _, idx = name.partition(".")
        if kind == "mid":
            cfg["mid_block_type"] = None
        elif kind == "down_attn":
            down[int(idx)] = down[int(idx)].replace("CrossAttnDownBlock2D", "DownBlock2D")
        elif kind == "up_attn":
            up[int(idx)] = up[int(idx)].replace("CrossAttnUpBlock2D", "UpBlock2D")
        elif kind == "depth":
            depths[int(idx)] -= 1
    cfg["down_block_types"], cfg["up_block_types"] = down, up
    if any(d != depths[0] for d in depths) or isinstance(cfg["transformer_layers_per_block"], (list, tuple)):
        cfg["transformer_layers_per_block"] = depths
    else:
        cfg["transformer_layers_per_block"] = depths[0]
    return cfg


def assemble_unet(teacher: nn.Module, edits: list[str]) -> nn.Module:
    """A lighter ``UNet2DConditionModel`` without ``edits``, initialised from ``teacher``'s weights.

    Every parameter of the student has the same name and shape in the teacher (the edits only
    remove modules), so the copy is exact; the teacher is not modified.
    """
    from diffusers import UNet2DConditionModel

    student = UNet2DConditionModel.from_config(assembled_config(teacher, edits))
    theirs = teacher.state_dict()
    mine = student.state_dict()
    missing = [k for k, v in mine.items() if k not in theirs or theirs[k].shape != v.shape]
    if missing:  # an edit that shifts names would land here; never initialise silently at random
        raise RuntimeError(f"assembled UNet has parameters the teacher lacks: {missing[:5]}")
    student.load_state_dict({k: theirs[k] for k in mine}, strict=True)
    dropped = sum(v.numel() for k, v in theirs.items() if k not in mine)
    logger.info("assembled UNet without %s: %d of %d parameters removed", edits, dropped,
                sum(v.numel() for v in theirs.values()))
    if student.dtype != teacher.dtype:
        student = student.to(dtype=teacher.dtype)
    return student.to(device=teacher.device).train(teacher.training)


def parameter_count(unet: nn.Module) -> int:
    return sum(p.numel() for p in unet.parameters())


def flops_per_call(unet: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> float:
    """FLOPs of one UNet call on these inputs (``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        unet(sample, timestep, context)
    return float(fc.get_total_flops())
