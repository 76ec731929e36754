"""The Two-Dimensional Shuffle Mixer (TDSM): RelaCtrl's cheap replacement for a copied DiT block.

RelaCtrl (https://arxiv.org/abs/2502.14377) swaps the self-attention and FFN of the usual
copied control block for a token mixer and a channel mixer that each work on groups, with
shuffles so that groups still exchange information. This implementation (our reading of the
abstract; the paper's exact layer sizes are not reproduced):

* **token mixer**: channels are split into ``groups`` heads; each head attends only inside a
  group of ``window × window`` tokens. Half of the heads use local windows of the 2-D token
  grid, the other half use *shuffled* (dilated) windows — tokens that share their position
  modulo the grid stride — so one block mixes both near and far tokens at the cost of
  ``window²`` keys per query instead of ``N``.
* **channel mixer**: grouped linear layers (``groups`` blocks) with a channel shuffle in
  between (ShuffleNet's), so every output group reads every input group at ``1/groups`` of the
  parameters of a dense FFN.
* **conditioning**: adaLN-single as in PixArt: the branch computes one ``6·C`` modulation from
  the timestep/text embedding, and each block adds its own learned ``(6, C)`` table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import ResidualIO, arg_getter

__all__ = ["GroupedLinear", "TDSMBlock", "channel_shuffle", "TDSM_IO"]


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the last dimension's ``groups`` groups (ShuffleNet): group ``j`` of the output
    takes one channel from every input group."""
    *lead, c = x.shape
    return x.reshape(*lead, groups, c // groups).transpose(-1, -2).reshape(*lead, c)


class GroupedLinear(nn.Module):
    """``groups`` independent linear maps, each from ``in/groups`` to ``out/groups`` channels."""

    def __init__(self, in_features: int, out_features: int, groups: int) -> None:
        super().__init__()
        if in_features % groups or out_features % groups:
            raise ValueError(f"GroupedLinear: {in_features} and {out_features} channels must both divide into "
                             f"{groups} groups; choose a group count that divides the width")
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(groups, in_features // groups, out_features // groups))
        self.bias = nn.Parameter(torch.zeros(out_features))
        nn.init.normal_(self.weight, std=(in_features // groups) ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *lead, c = x.shape
        y = torch.einsum("ngi,gio->ngo", x.reshape(-1, self.groups, c // self.groups), self.weight)
        return y.reshape(*lead, -1) + self.bias


def _windows(x: torch.Tensor, grid: tuple[int, int], window: int, shuffled: bool) -> torch.Tensor:
    """(B, H·W, g, d) -> (B·groups, g, window², d): local windows, or dilated ones when ``shuffled``."""
    b, _, g, d = x.shape
    h, w = grid
    sh, sw = h // window, w // window
    if shuffled:  # row = a·sh + r: group by (r, c), the window runs over a
        x = x.reshape(b, window, sh, window, sw, g, d).permute(0, 2, 4, 5, 1, 3, 6)
    else:  # row = r·window + a: group by (r, c), the window runs over a
        x = x.reshape(b, sh, window, sw, window, g, d).permute(0, 1, 3, 5, 2, 4, 6)
    return x.reshape(b * sh * sw, g, window * window, d)


def _unwindows(x: torch.Tensor, b: int, grid: tuple[int, int], window: int, shuffled: bool) -> torch.Tensor:
    """Inverse of :func:`_windows`: (B·groups, g, window², d) -> (B, H·W, g, d)."""
    h, w = grid
    sh, sw = h // window, w // window
    g, d = x.shape[1], x.shape[3]
    x = x.reshape(b, sh, sw, g, window, window, d)
    if shuffled:
        x = x.permute(0, 4, 1, 5, 2, 3, 6)
    else:
        x = x.permute(0, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, h * w, g, d)


class TDSMBlock(nn.Module):
    """One RelaCtrl control block: TDSM token mixer then grouped, shuffled channel mixer.

    Args:
        dim: token width ``C``.
        groups: channel groups (attention heads and grouped-linear blocks); even, dividing ``dim``.
        window: side of the 2-D token windows; must divide the token grid's sides.
        mlp_ratio: hidden width of the channel mixer as a multiple of ``dim`` (RelaCtrl's
            relevance-scaled capacity: larger where the position matters more).
    """

    def __init__(self, dim: int, groups: int = 4, window: int = 4, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        if groups < 2 or groups % 2:
            raise ValueError(f"TDSMBlock needs an even number of groups >= 2 (half local, half shuffled), got {groups}")
        hidden = int(round(dim * mlp_ratio / groups)) * groups
        if hidden < groups:
            raise ValueError(f"mlp_ratio {mlp_ratio} leaves no hidden channels for {groups} groups; raise it")
        self.dim, self.groups, self.window = dim, groups, window
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = GroupedLinear(dim, 3 * dim, groups)
        self.proj = GroupedLinear(dim, dim, groups)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.fc1 = GroupedLinear(dim, hidden, groups)
        self.fc2 = GroupedLinear(hidden, dim, groups)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def check_grid(self, grid: tuple[int, int]) -> None:
        if grid[0] % self.window or grid[1] % self.window:
            raise ValueError(f"the {grid[0]}x{grid[1]} token grid does not divide into {self.window}x{self.window} "
                             "windows; build the branch with a window that divides both sides")

    def token_mixer(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        g, half = self.groups, self.groups // 2
        q, k, v = self.qkv(x).reshape(b, n, 3, g, c // g).unbind(2)
        out = []
        for part, shuffled in ((slice(0, half), False), (slice(half, g), True)):
            qw, kw, vw = (_windows(t[:, :, part], grid, self.window, shuffled) for t in (q, k, v))
            o = F.scaled_dot_product_attention(qw, kw, vw)
            out.append(_unwindows(o, b, grid, self.window, shuffled))
        mixed = torch.cat(out, dim=2).reshape(b, n, c)
        return self.proj(channel_shuffle(mixed, g))

    def channel_mixer(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(channel_shuffle(F.gelu(self.fc1(x), approximate="tanh"), self.groups))

    def forward(self, hidden_states: torch.Tensor, modulation: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``hidden_states`` (B, H·W, C) on an ``H × W`` ``grid``; ``modulation`` (B, 6·C) from the branch."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (
            self.scale_shift_table[None] + modulation.reshape(-1, 6, self.dim)).unbind(1)
        h = self.norm1(hidden_states) * (1 + scale1[:, None]) + shift1[:, None]
        hidden_states = hidden_states + gate1[:, None] * self.token_mixer(h, grid)
        h = self.norm2(hidden_states) * (1 + scale2[:, None]) + shift2[:, None]
        return hidden_states + gate2[:, None] * self.channel_mixer(h)


# a skipped TDSM block passes its input on (used by relevance analysis and block dropping)
_hidden = arg_getter("hidden_states", 0)
TDSM_IO = ResidualIO(inputs=lambda a, k: (_hidden(a, k), None), outputs=lambda out: (out, None),
                     build=lambda t, a, k: t[0])
