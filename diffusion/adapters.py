"""Diffusion denoiser adapters: where a UNet's or a diffusion transformer's blocks, layers and units are.

Registered in :mod:`mmskip.registry` with ``kind="diffusion"`` for ``UNet2DConditionModel``,
``DiTTransformer2DModel``, ``PixArtTransformer2DModel`` and ``SD3Transformer2DModel``. The
granularities follow A-SDM's feature inheritance (Zhu et al., 2024): *block* (UNet down/mid/up
blocks; a contiguous range of transformer blocks), *layer* (an attention or feed-forward module
inside a block) and *unit* (a residual unit: a UNet ResNet or Transformer2D layer, one
transformer block).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmskip.registry import register

__all__ = ["DiffusionAdapter", "ResidualIO", "GRANULARITIES"]

logger = logging.getLogger(__name__)

GRANULARITIES = ("block", "layer", "unit")


@dataclass
class ResidualIO:
    """How to read the residual-stream tensors a module takes and rebuild its output from them.

    ``inputs(args, kwargs)`` returns the stream tensors the module receives; ``outputs(out)`` the
    same tensors after it (same order, ``None`` where absent); ``build(tensors, args, kwargs)``
    wraps tensors into the module's output format.
    """

    inputs: Callable[[tuple, dict], tuple[torch.Tensor | None, ...]]
    outputs: Callable[[Any], tuple[torch.Tensor | None, ...]]
    build: Callable[[tuple[torch.Tensor | None, ...], tuple, dict], Any]


def _arg(name: str, index: int) -> Callable[[tuple, dict], Any]:
    def get(args: tuple, kwargs: dict) -> Any:
        if name in kwargs:
            return kwargs[name]
        return args[index] if len(args) > index else None

    return get


_hidden0 = _arg("hidden_states", 0)

# BasicTransformerBlock / PixArt / DiT: forward(hidden_states, ...) -> Tensor
_BASIC_IO = ResidualIO(
    inputs=lambda a, k: (_hidden0(a, k),),
    outputs=lambda out: (out,),
    build=lambda t, a, k: t[0],
)
_enc1 = _arg("encoder_hidden_states", 1)
# JointTransformerBlock (SD3): forward(hidden_states, encoder_hidden_states, temb) -> (encoder, hidden)
_JOINT_IO = ResidualIO(
    inputs=lambda a, k: (_enc1(a, k), _hidden0(a, k)),
    outputs=lambda out: tuple(out),
    build=lambda t, a, k: (t[0], t[1]),
)
_input_tensor0 = _arg("input_tensor", 0)
# ResnetBlock2D: forward(input_tensor, temb) -> Tensor
_RESNET_IO = ResidualIO(
    inputs=lambda a, k: (_input_tensor0(a, k),),
    outputs=lambda out: (out,),
    build=lambda t, a, k: t[0],
)


def _t2d_build(t: tuple, a: tuple, k: dict) -> Any:
    if k.get("return_dict", True):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=t[0])
    return (t[0],)


# Transformer2DModel inside a UNet: forward(hidden_states, ...) -> (sample,) or Transformer2DModelOutput
_T2D_IO = ResidualIO(
    inputs=lambda a, k: (_hidden0(a, k),),
    outputs=lambda out: (out[0] if isinstance(out, tuple) else out.sample,),
    build=_t2d_build,
)

_IO_BY_CLASS: dict[str, ResidualIO] = {
    "BasicTransformerBlock": _BASIC_IO,
    "JointTransformerBlock": _JOINT_IO,
    "ResnetBlock2D": _RESNET_IO,
    "Transformer2DModel": _T2D_IO,
}


@dataclass
class DiffusionAdapter:
    """Where things are in one diffusion denoiser. One instance per model.

    ``blocks`` are the coarse blocks in execution order (names relative to the model);
    ``transformer_blocks`` is the name of the sequential block list of a diffusion transformer
    (``None`` for a UNet, whose blocks are inherited whole). ``timestep_index`` is the position
    of ``timestep`` in the model's forward when passed positionally.
    """

    model: nn.Module
    blocks: list[str]
    transformer_blocks: str | None
    probe: str
    timestep_index: int
    layer_classes: tuple[str, ...] = ("Attention", "FeedForward")
    unit_classes: tuple[str, ...] = ()
    default_region: list[str] = field(default_factory=list)

    @property
    def is_unet(self) -> bool:
        return self.transformer_blocks is None

    @property
    def num_blocks(self) -> int:
        if self.is_unet:
            return len(self.blocks)
        return len(self.module(self.transformer_blocks))

    def module(self, name: str) -> nn.Module:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{type(self.model).__name__} has no module named {name!r}") from None

    def timestep(self, args: tuple, kwargs: dict) -> float | None:
        t = kwargs.get("timestep")
        if t is None and len(args) > self.timestep_index:
            t = args[self.timestep_index]
        if t is None:
            return None
        if isinstance(t, torch.Tensor):
            return float(t.flatten()[0]) if t.numel() else None
        return float(t)

    # -- what each granularity can target --------------------------------------------------------
    def candidates(self, granularity: str) -> list[str]:
        """Every valid target name at ``granularity`` (block ranges ``a:b`` are also accepted)."""
        if granularity == "block":
            return list(self.blocks)
        classes = self.layer_classes if granularity == "layer" else self.unit_classes
        out = []
        for region in self.blocks:
            root = self.module(region)
            for name, mod in root.named_modules():
                if name and type(mod).__name__ in classes and not _inside(name, out, region):
                    out.append(f"{region}.{name}")
        if granularity == "unit" and not self.is_unet:
            out = list(self.blocks)  # a transformer block is one residual unit
        return out

    def defaults(self, granularity: str) -> list[str]:
        """The default targets: the deep region (all blocks but the first and the last).

        For a UNet this is DeepCache's shape: only ``down_blocks.0`` and ``up_blocks[-1]`` (the
        shallow, high-resolution branch) keep recomputing; for a transformer the first and last
        blocks keep recomputing (the first is the adaptive probe).
        """
        region = self.default_region
        if granularity == "block":
            if self.is_unet:
                return list(region)
            return [f"{self.transformer_blocks}.{_idx(region[0])}:{_idx(region[-1]) + 1}"]
        return [c for c in self.candidates(granularity) if any(c == r or c.startswith(r + ".") for r in region)]

    def io(self, module: nn.Module) -> ResidualIO | None:
        """The residual IO of ``module`` if it is a residual unit (output = input + contribution)."""
        io = _IO_BY_CLASS.get(type(module).__name__)
        if io is _RESNET_IO and getattr(module, "conv_shortcut", None) is not None:
            return None  # channel change: not a residual unit; its output is inherited instead
        if io is _RESNET_IO and getattr(module, "output_scale_factor", 1.0) != 1.0:
            return None
        return io


def _idx(name: str) -> int:
    return int(name.rsplit(".", 1)[1])


def _inside(name: str, found: list[str], region: str) -> bool:
    return any(name.startswith(f[len(region) + 1 :] + ".") for f in found)


def _unet(model: nn.Module) -> DiffusionAdapter:
    blocks = [f"down_blocks.{i}" for i in range(len(model.down_blocks))]
    if model.mid_block is not None:
        blocks.append("mid_block")
    blocks += [f"up_blocks.{i}" for i in range(len(model.up_blocks))]
    return DiffusionAdapter(
        model=model,
        blocks=blocks,
        transformer_blocks=None,
        probe="down_blocks.0",
        timestep_index=1,
        unit_classes=("ResnetBlock2D", "Transformer2DModel"),
        default_region=blocks[1:-1],
    )


def _transformer(timestep_index: int) -> Callable[[nn.Module], DiffusionAdapter]:
    def make(model: nn.Module) -> DiffusionAdapter:
        n = len(model.transformer_blocks)
        blocks = [f"transformer_blocks.{i}" for i in range(n)]
        region = blocks[1:-1] if n > 2 else blocks[-1:]
        return DiffusionAdapter(
            model=model,
            blocks=blocks,
            transformer_blocks="transformer_blocks",
            probe="transformer_blocks.0",
            timestep_index=timestep_index,
            unit_classes=("BasicTransformerBlock", "JointTransformerBlock"),
            default_region=region,
        )

    return make


register("UNet2DConditionModel", kind="diffusion")(_unet)
register("DiTTransformer2DModel", kind="diffusion")(_transformer(1))
register("PixArtTransformer2DModel", kind="diffusion")(_transformer(2))
register("SD3Transformer2DModel", kind="diffusion")(_transformer(3))
