"""Where a transformer ControlNet's control blocks sit, and how to skip them at inference.

A transformer ControlNet (PixArt-δ, diffusers' ``FluxControlNetModel`` and
``SD3ControlNetModel``, RelaCtrl's branch) runs a chain of control blocks; after block ``i`` a
zero-initialised projection turns the chain's state into a residual that the base model adds
after its block at position ``i``. *Skipping* control position ``i`` (RelaCtrl's relevance
probe) means the block passes its input on and its projection adds nothing; neither is
computed. Skipping is a technique (:class:`~.config.ControlSkipConfig`, applied with
``mmskip.apply``, removed exactly); :func:`skipped_control` applies it for a ``with`` block.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from mmskip.inject import applied

from ..adapters import ResidualIO, registry_io
from .config import ControlSkipConfig
from .tdsm import TDSM_IO, TDSMBlock

__all__ = ["ControlPosition", "control_positions", "skipped_control", "UnsupportedControlNetError", "block_io"]

# (block list, projection list, position-name prefix, offset of the base position)
_LAYOUTS = (("transformer_blocks", "controlnet_blocks", "double"),
            ("single_transformer_blocks", "controlnet_single_blocks", "single"))


class UnsupportedControlNetError(TypeError):
    """A model that is not a transformer ControlNet with per-block output projections."""


@dataclass(frozen=True)
class ControlPosition:
    """One control block and the projection that feeds its output into the base model.

    ``name`` is ``"double.i"`` / ``"single.i"`` for the base model's dual- and single-stream block
    ``i`` (Flux; SD3 and PixArt have only ``"double"``), ``index`` the position over all of them.
    """

    name: str
    index: int
    block: nn.Module
    projection: nn.Module


def block_io(block: nn.Module) -> ResidualIO:
    """How a control block's stream is read and rebuilt (to pass its input on)."""
    if isinstance(block, TDSMBlock):
        return TDSM_IO
    io = registry_io(type(block))
    if io is None:
        raise UnsupportedControlNetError(
            f"cannot skip a {type(block).__name__} control block: it is not in diffusers' TransformerBlockRegistry. "
            "Register it there (diffusers.hooks._helpers.TransformerBlockRegistry) to analyse this ControlNet.")
    return io


def control_positions(controlnet: nn.Module) -> list[ControlPosition]:
    """The control positions of ``controlnet`` in the base model's block order."""
    found: list[ControlPosition] = []
    if hasattr(controlnet, "control_positions"):  # RelaCtrl's branch names its own positions
        return list(controlnet.control_positions())
    offset = 0
    for blocks_attr, proj_attr, prefix in _LAYOUTS:
        blocks, projs = getattr(controlnet, blocks_attr, None), getattr(controlnet, proj_attr, None)
        if blocks is None or projs is None:
            continue
        for i, (block, proj) in enumerate(zip(blocks, projs, strict=False)):
            found.append(ControlPosition(f"{prefix}.{i}", offset + i, block, proj))
        offset += len(blocks)
    if not found:
        raise UnsupportedControlNetError(
            f"{type(controlnet).__name__} has no control blocks with output projections; supported: "
            "FluxControlNetModel, SD3ControlNetModel, PixArt-style branches with transformer_blocks + "
            "controlnet_blocks, and mmskip's RelaCtrlFluxNet")
    return found


@contextmanager
def skipped_control(controlnet: nn.Module, names: Iterable[str]) -> Iterator[nn.Module]:
    """``controlnet`` with the control positions ``names`` skipped (:class:`~.config.ControlSkipConfig`
    applied for the block); restored exactly on exit."""
    with applied(controlnet, ControlSkipConfig(positions=tuple(names))):
        yield controlnet
