"""Diffusion denoiser adapters: where a UNet's or a diffusion transformer's blocks, layers and units are.

Registered in :mod:`mmskip.registry` with ``kind="diffusion"``: ``UNet2DConditionModel`` by
name, and every diffusion transformer whose blocks diffusers' ``TransformerBlockRegistry``
describes (DiT, PixArt, SD3, Flux, Flux2, Qwen-Image, Z-Image, Wan, HunyuanVideo, LTX,
CogVideoX, Mochi, CogView4, HunyuanImage, Kandinsky 5, ...; see :func:`registry_families`)
through a registry fallback that finds the model's block lists. Block I/O comes from diffusers'
metadata (:mod:`mmskip.diffusion.adapters.block_registry`); the hand table here covers only the UNet's units. The
granularities follow A-SDM's feature inheritance (Zhu et al., 2024): *block* (UNet down/mid/up
blocks; a contiguous range of transformer blocks), *layer* (an attention or feed-forward module
inside a block) and *unit* (a residual unit: a UNet ResNet or Transformer2D layer, one
transformer block).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmskip.registry import register, register_fallback

from ..tracker import CallKeyMemo, call_key
from .block_registry import registered_block_classes, registry_io
from .residual_io import ResidualIO, arg_getter

__all__ = ["DiffusionAdapter", "ResidualIO", "GRANULARITIES", "registry_families"]

logger = logging.getLogger(__name__)

GRANULARITIES = ("block", "layer", "unit")


_input_tensor0 = arg_getter("input_tensor", 0)
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
    inputs=lambda a, k: (arg_getter("hidden_states", 0)(a, k),),
    outputs=lambda out: (out[0] if isinstance(out, tuple) else out.sample,),
    build=_t2d_build,
)

# The hand table: only what diffusers' TransformerBlockRegistry does not describe (UNet units).
_IO_BY_CLASS: dict[str, ResidualIO] = {
    "ResnetBlock2D": _RESNET_IO,
    "Transformer2DModel": _T2D_IO,
}




@dataclass
class DiffusionAdapter:
    """Where things are in one diffusion denoiser. One instance per model.

    ``blocks`` are the coarse blocks in execution order (names relative to the model);
    ``stacks`` name the sequential block lists of a diffusion transformer in execution order
    (Flux: ``transformer_blocks`` then ``single_transformer_blocks``; empty for a UNet, whose
    blocks are inherited whole). ``timestep_name`` / ``timestep_index`` locate the timestep in
    the model's forward and ``latent_name`` the latent; ``time_sign`` is -1 for families whose
    pipelines pass a timestep that grows along the trajectory (Z-Image's ``(1000 - t) / 1000``).
    """

    model: nn.Module
    blocks: list[str]
    stacks: tuple[str, ...]
    probe: str
    timestep_index: int
    timestep_name: str = "timestep"
    latent_name: str = "hidden_states"
    time_sign: float = 1.0
    layer_classes: tuple[str, ...] = ("Attention", "FeedForward")
    unit_classes: tuple[str, ...] = ()
    default_region: list[str] = field(default_factory=list)
    default_stacks: tuple[str, ...] = ()

    @property
    def is_unet(self) -> bool:
        return not self.stacks

    @property
    def transformer_blocks(self) -> str | None:
        """The first (for most families the only) block list; None for a UNet."""
        return self.stacks[0] if self.stacks else None

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def module(self, name: str) -> nn.Module:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{type(self.model).__name__} has no module named {name!r}") from None

    def timestep(self, args: tuple, kwargs: dict) -> float | None:
        """The call's timestep as the step tracker sees it (decreasing along a trajectory)."""
        t = kwargs.get(self.timestep_name)
        if t is None and len(args) > self.timestep_index:
            t = args[self.timestep_index]
        if t is None:
            return None
        if isinstance(t, torch.Tensor):
            return self.time_sign * float(t.flatten()[0]) if t.numel() else None
        return self.time_sign * float(t)

    def call_key(self, args: tuple, kwargs: dict, memo: CallKeyMemo | None = None) -> Any:
        """The call's conditioning fingerprint: every input but the latent and the timestep
        (:func:`~mmskip.diffusion.tracker.call_key`); with a ``memo``, reused while the calls pass
        the same, unchanged conditioning tensors (:class:`~mmskip.diffusion.tracker.CallKeyMemo`)."""
        skip = ((0, self.timestep_index), (self.latent_name, self.timestep_name))
        return call_key(args, kwargs, *skip) if memo is None else memo.key(args, kwargs, *skip)

    # -- what each granularity can target --------------------------------------------------------
    def candidates(self, granularity: str) -> list[str]:
        """Every valid target name at ``granularity`` (block ranges ``a:b`` are also accepted)."""
        if granularity == "block" or (granularity == "unit" and not self.is_unet):
            return list(self.blocks)  # a transformer block is one residual unit
        out: list[str] = []
        for region in self.blocks:
            root = self.module(region)
            for name, mod in root.named_modules():
                if name and self._is_target(mod, granularity) and not _inside(name, out, region):
                    out.append(f"{region}.{name}")
        return out

    def _is_target(self, mod: nn.Module, granularity: str) -> bool:
        name = type(mod).__name__
        if granularity == "unit":
            return name in self.unit_classes
        return any(name == c or name.endswith(c) for c in self.layer_classes)

    def defaults(self, granularity: str) -> list[str]:
        """The default targets: the deep region (all blocks but the first and the last).

        For a UNet this is DeepCache's shape: only ``down_blocks.0`` and ``up_blocks[-1]`` (the
        shallow, high-resolution branch) keep recomputing; for a transformer the first and last
        blocks of the main stacks keep recomputing (the first is the adaptive probe), one range
        per stack. Side stacks (Z-Image's and HunyuanVideo's refiners) are not in the default.
        """
        region = self.default_region
        if granularity == "block":
            if self.is_unet:
                return list(region)
            out = []
            for stack in self.default_stacks:
                idx = [_idx(r) for r in region if r.rsplit(".", 1)[0] == stack]
                if idx:
                    out.append(f"{stack}.{idx[0]}:{idx[-1] + 1}")
            return out
        return [c for c in self.candidates(granularity) if any(c == r or c.startswith(r + ".") for r in region)]

    def io(self, module: nn.Module) -> ResidualIO | None:
        """The residual IO of ``module`` if it is a residual unit (output = input + contribution)."""
        io = registry_io(type(module)) or _IO_BY_CLASS.get(type(module).__name__)
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
        stacks=(),
        probe="down_blocks.0",
        timestep_index=1,
        latent_name="sample",
        unit_classes=("ResnetBlock2D", "Transformer2DModel"),
        default_region=blocks[1:-1],
    )


# Pipelines of these families pass a timestep that grows from noise to data.
_INCREASING_TIME = ("ZImageTransformer2DModel", "MochiTransformer3DModel", "Lumina2Transformer2DModel")
_SIDE_STACK_WORDS = ("refiner",)


def _block_stacks(model: nn.Module) -> list[str]:
    """Direct children that are lists of residual transformer blocks, in definition order."""
    out = []
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList) and len(child) and registry_io(type(child[0])) is not None:
            out.append(name)
    return out


def _transformer(model: nn.Module) -> DiffusionAdapter | None:
    """The adapter of a diffusion transformer whose block lists diffusers' block registry describes."""
    stacks = _block_stacks(model)
    if not stacks:
        return None
    params = list(inspect.signature(type(model).forward).parameters)[1:]
    t_name = next((p for p in ("timestep", "t", "timesteps") if p in params), None)
    if t_name is None:
        return None
    main = [s for s in stacks if not any(w in s for w in _SIDE_STACK_WORDS)] or stacks
    blocks = [f"{s}.{i}" for s in stacks for i in range(len(model.get_submodule(s)))]
    main_blocks = [b for b in blocks if b.rsplit(".", 1)[0] in main]
    region = main_blocks[1:-1] if len(main_blocks) > 2 else main_blocks[-1:]
    return DiffusionAdapter(
        model=model,
        blocks=blocks,
        stacks=tuple(stacks),
        probe=main_blocks[0],
        timestep_index=params.index(t_name),
        timestep_name=t_name,
        latent_name=params[0],
        time_sign=-1.0 if type(model).__name__ in _INCREASING_TIME else 1.0,
        unit_classes=tuple(sorted({type(model.get_submodule(s)[0]).__name__ for s in stacks})),
        default_region=region,
        default_stacks=tuple(main),
    )


def registry_families() -> dict[str, list[str]]:
    """Diffusion transformers whose blocks diffusers' block registry describes: ``{model: [blocks]}``.

    The families diffusers' own caches support, and so mmskip's feature inheritance. A model is
    listed when its class lives in the module that defines a registered block (DiT, PixArt and
    SD3 use the shared blocks of ``diffusers.models.attention`` and are added by name).
    Imports each block's diffusers module.
    """
    import sys

    from diffusers import ModelMixin

    out: dict[str, list[str]] = {
        "DiTTransformer2DModel": ["BasicTransformerBlock"],
        "PixArtTransformer2DModel": ["BasicTransformerBlock"],
        "SD3Transformer2DModel": ["JointTransformerBlock"],
    }
    for block in registered_block_classes():
        mod = sys.modules[block.__module__]
        for name, obj in vars(mod).items():
            if (
                isinstance(obj, type) and issubclass(obj, ModelMixin) and obj.__module__ == mod.__name__
                and name.endswith("Model") and "ControlNet" not in name
            ):
                out.setdefault(name, []).append(block.__name__)
    return dict(sorted(out.items()))


register("UNet2DConditionModel", kind="diffusion")(_unet)
# named here so that supported("diffusion") lists them; any other registry family is found by the fallback
register(
    "DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel", "FluxTransformer2DModel",
    "Flux2Transformer2DModel", "QwenImageTransformer2DModel", "ZImageTransformer2DModel", "WanTransformer3DModel",
    "HunyuanVideoTransformer3DModel", "LTXVideoTransformer3DModel", "CogVideoXTransformer3DModel",
    kind="diffusion",
)(lambda model: _transformer(model) or _no_blocks(model))
register_fallback(
    "diffusion", _transformer,
    hint="or any diffusion transformer whose block lists hold blocks diffusers' TransformerBlockRegistry describes",
)


def _no_blocks(model: nn.Module) -> DiffusionAdapter:
    raise ValueError(
        f"{type(model).__name__} has no list of transformer blocks that diffusers' TransformerBlockRegistry "
        "describes; feature inheritance cannot find its residual stream"
    )
