"""RelaCtrl's control branch for Flux transformers, a drop-in for ``FluxControlNetModel``.

RelaCtrl (https://arxiv.org/abs/2502.14377) places control blocks only at the positions of the
base model where control matters most (its ControlNet Relevance Score), scales their capacity by
that relevance, and builds them from TDSM blocks instead of copies of the base blocks. The
branch here is a chain, as PixArt-δ's: ``x_embed(latents) + zero_embed(control)`` runs through
the TDSM blocks in base order, and after block ``k`` a zero-initialised projection makes the
residual the base adds after its block at ``positions[k]``. With every projection at zero the
base model's output is unchanged (ControlNet's zero convolutions).

It subclasses ``FluxControlNetModel`` only so that diffusers' ``FluxControlNetPipeline``
accepts it (the pipeline checks the class to prepare the control image); its layers are its
own. Where this departs from the paper: the blocks see text only through the pooled embedding
(adaLN), not by cross-attention, and the branch returns a residual for every base block
(zeros where it has none) because Flux maps control residuals to blocks by a fixed interval.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models import FluxControlNetModel
from diffusers.models.controlnets.controlnet import zero_module
from diffusers.models.controlnets.controlnet_flux import FluxControlNetOutput
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .positions import ControlPosition
from .tdsm import TDSMBlock

__all__ = ["RelaCtrlFluxNet"]

logger = logging.getLogger(__name__)


class RelaCtrlFluxNet(FluxControlNetModel):
    """A relevance-guided TDSM control branch for a ``FluxTransformer2DModel``.

    Args:
        in_channels: packed latent channels of the base transformer (Flux: 64; the zoo: 16).
        inner_dim: the base transformer's width (``num_attention_heads * attention_head_dim``).
        pooled_projection_dim: width of the pooled text embedding.
        num_layers: the base model's dual-stream blocks.
        num_single_layers: the base model's single-stream blocks.
        positions: base positions (0 … num_layers + num_single_layers − 1) that get a control block,
            strictly increasing.
        mlp_ratios: the channel-mixer width of each block (relevance-scaled capacity).
        groups: channel groups of every TDSM block.
        window: side of the TDSM token windows.
        guidance_embeds: kept ``False``; the pipeline reads it.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, in_channels: int = 64, inner_dim: int = 3072, pooled_projection_dim: int = 768,
                 num_layers: int = 19, num_single_layers: int = 38, positions: Sequence[int] = (0,),
                 mlp_ratios: Sequence[float] = (2.0,), groups: int = 4, window: int = 4,
                 guidance_embeds: bool = False) -> None:
        ModelMixin.__init__(self)  # not FluxControlNetModel's: none of its copied blocks are built
        positions, mlp_ratios = list(positions), list(mlp_ratios)
        total = num_layers + num_single_layers
        if not positions or positions != sorted(set(positions)) or positions[0] < 0 or positions[-1] >= total:
            raise ValueError(f"positions must be strictly increasing base positions in [0, {total}), got {positions}")
        if len(mlp_ratios) != len(positions):
            raise ValueError(f"give one mlp ratio per position: {len(positions)} positions, {len(mlp_ratios)} ratios")
        if guidance_embeds:
            raise ValueError("RelaCtrlFluxNet does not embed guidance; build it for a model with guidance_embeds=False")
        self.input_hint_block = None  # FluxControlNetPipeline: control arrives as packed VAE latents
        self.union = False
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(inner_dim, pooled_projection_dim)
        self.x_embedder = nn.Linear(in_channels, inner_dim)
        self.controlnet_x_embedder = zero_module(nn.Linear(in_channels, inner_dim))
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(inner_dim, 6 * inner_dim))  # adaLN-single
        self.blocks = nn.ModuleList(TDSMBlock(inner_dim, groups, window, r) for r in mlp_ratios)
        self.controlnet_blocks = nn.ModuleList(zero_module(nn.Linear(inner_dim, inner_dim)) for _ in positions)
        self.gradient_checkpointing = False

    @classmethod
    def from_transformer(cls, transformer: nn.Module, positions: Sequence[int], mlp_ratios: Sequence[float],
                         groups: int = 4, window: int = 4) -> RelaCtrlFluxNet:
        """A branch sized for ``transformer``; its latent and timestep/text embedders start as copies
        of the base's (as diffusers' ``FluxControlNetModel.from_transformer`` does)."""
        c = transformer.config
        net = cls(in_channels=c.in_channels, inner_dim=c.num_attention_heads * c.attention_head_dim,
                  pooled_projection_dim=c.pooled_projection_dim, num_layers=c.num_layers,
                  num_single_layers=c.num_single_layers, positions=tuple(positions), mlp_ratios=tuple(mlp_ratios),
                  groups=groups, window=window)
        if c.guidance_embeds:
            raise ValueError("the base transformer embeds guidance; RelaCtrlFluxNet supports guidance_embeds=False")
        net.x_embedder.load_state_dict(transformer.x_embedder.state_dict())
        net.time_text_embed.load_state_dict(transformer.time_text_embed.state_dict())
        return net.to(next(transformer.parameters()).dtype)

    def control_positions(self) -> list[ControlPosition]:
        """The positions this branch controls, named as for diffusers' ControlNets."""
        n = self.config.num_layers
        return [ControlPosition(f"double.{p}" if p < n else f"single.{p - n}", p, block, proj)
                for p, block, proj in zip(self.config.positions, self.blocks, self.controlnet_blocks, strict=True)]

    def forward(self, hidden_states: torch.Tensor, controlnet_cond: torch.Tensor,
                controlnet_mode: torch.Tensor | None = None, conditioning_scale: float = 1.0,
                encoder_hidden_states: torch.Tensor | None = None, pooled_projections: torch.Tensor | None = None,
                timestep: torch.Tensor | None = None, img_ids: torch.Tensor | None = None,
                txt_ids: torch.Tensor | None = None, guidance: torch.Tensor | None = None,
                joint_attention_kwargs: dict | None = None, return_dict: bool = True):
        """Control residuals for every base block, in ``FluxControlNetModel``'s output format.

        Takes what ``FluxControlNetPipeline`` passes; ``encoder_hidden_states`` and ``txt_ids`` are
        not used (text enters through ``pooled_projections``), ``img_ids`` gives the token grid.
        """
        if controlnet_mode is not None:
            raise ValueError("RelaCtrlFluxNet has no union modes; call it with controlnet_mode=None")
        if img_ids is None:
            raise ValueError("RelaCtrlFluxNet needs img_ids (the packed token grid) to form its 2-D windows")
        ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        grid = (int(ids[:, 1].max().item()) + 1, int(ids[:, 2].max().item()) + 1)
        if grid[0] * grid[1] != hidden_states.shape[1]:
            raise ValueError(f"img_ids describe a {grid[0]}x{grid[1]} grid but there are {hidden_states.shape[1]} "
                             "image tokens; pass the ids the pipeline builds")
        for block in self.blocks:
            block.check_grid(grid)
        temb = self.time_text_embed(timestep.to(hidden_states.dtype) * 1000, pooled_projections)
        modulation = self.t_block(temb)
        h = self.x_embedder(hidden_states) + self.controlnet_x_embedder(controlnet_cond)
        n = self.config.num_layers
        zeros = torch.zeros_like(hidden_states[..., :1]).expand(*hidden_states.shape[:2], h.shape[-1])
        double = [zeros] * n
        single = [zeros] * self.config.num_single_layers
        for p, block, proj in zip(self.config.positions, self.blocks, self.controlnet_blocks, strict=True):
            h = block(h, modulation, grid)
            residual = proj(h) * conditioning_scale
            if p < n:
                double[p] = residual
            else:
                single[p - n] = residual
        double_out = double if any(p < n for p in self.config.positions) else None
        single_out = single if any(p >= n for p in self.config.positions) else None
        if not return_dict:
            return (double_out, single_out)
        return FluxControlNetOutput(controlnet_block_samples=double_out, controlnet_single_block_samples=single_out)
