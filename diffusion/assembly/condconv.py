"""ME-CondConv: multi-expert conditional convolution (A-SDM), to win back capacity after assembly.

A-SDM inserts multi-expert conditional convolutions into the compressed UNet "to enhance network
performance by increasing capacity without sacrificing speed" (https://arxiv.org/abs/2406.00210);
the layer is CondConv (Yang et al., 2019, https://arxiv.org/abs/1904.04971): ``E`` expert kernels
mixed per sample by a router on the globally pooled input, then one convolution with the mixed
kernel. The FLOPs of the convolution do not grow with ``E``; only the small mix ``sum_e r_e W_e``
per sample is added.

Departure, stated: the router is a softmax over experts (CondConv uses independent sigmoids), so
that one expert is exactly the convolution it replaced, and experts initialised as copies of
that convolution leave the output unchanged at insertion; training then pulls them apart.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MECondConv2d", "insert_condconv", "condconv_targets", "CONDCONV_FILE"]

logger = logging.getLogger(__name__)

CONDCONV_FILE = "mmskip_condconv.json"


class MECondConv2d(nn.Module):
    """A ``Conv2d`` with ``num_experts`` kernels mixed per sample by a softmax router on the pooled input.

    Args:
        conv: the convolution to replace; every expert starts as a copy of its weight and bias.
        num_experts: experts (``1``: exactly ``conv``).
    """

    def __init__(self, conv: nn.Conv2d, num_experts: int = 4) -> None:
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"ME-CondConv replaces nn.Conv2d, got {type(conv).__name__}")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if conv.padding_mode != "zeros":
            raise ValueError("ME-CondConv supports zero padding only")
        self.num_experts = num_experts
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        w = conv.weight.detach()
        self.weight = nn.Parameter(w.unsqueeze(0).repeat(num_experts, *[1] * w.dim()).clone())
        self.bias = None
        if conv.bias is not None:
            self.bias = nn.Parameter(conv.bias.detach().unsqueeze(0).repeat(num_experts, 1).clone())
        self.router = nn.Linear(conv.in_channels, num_experts)
        nn.init.zeros_(self.router.weight)
        nn.init.zeros_(self.router.bias)

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, experts) mixing weights from the globally pooled input."""
        return torch.softmax(self.router(x.mean(dim=(2, 3))), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_experts == 1:  # softmax of one logit is exactly 1: the replaced convolution
            b = self.bias[0] if self.bias is not None else None
            return F.conv2d(x, self.weight[0], b, self.stride, self.padding, self.dilation, self.groups)
        r = self.routing(x)  # (B, E)
        n = x.shape[0]
        w = torch.einsum("be,e...->b...", r, self.weight)  # (B, out, in/groups, kh, kw)
        w = w.reshape(n * self.out_channels, *w.shape[2:])
        b = (r @ self.bias).reshape(-1) if self.bias is not None else None
        y = F.conv2d(x.reshape(1, n * x.shape[1], *x.shape[2:]), w, b, self.stride, self.padding, self.dilation,
                     self.groups * n)
        return y.reshape(n, self.out_channels, *y.shape[2:])

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, experts={self.num_experts}"


def condconv_targets(unet: nn.Module, where: str = "resnets") -> list[str]:
    """Names of the convolutions to replace: ``"resnets"`` = ``conv1``/``conv2`` of every ResNet block."""
    if where != "resnets":
        raise ValueError(f"where must be 'resnets', got {where!r}")
    return [n for n, m in unet.named_modules()
            if isinstance(m, nn.Conv2d) and type(unet.get_submodule(n.rsplit(".", 1)[0])).__name__ == "ResnetBlock2D"
            and n.rsplit(".", 1)[1] in ("conv1", "conv2")]


def insert_condconv(unet: nn.Module, names: list[str] | None = None, num_experts: int = 4) -> list[str]:
    """Replace the convolutions ``names`` (default :func:`condconv_targets`) with :class:`MECondConv2d`, in place.

    An architecture change for training, not a removable hook: save the result with
    :func:`mmskip.diffusion.assembly.save_assembled`, which records where the layers sit.
    """
    names = condconv_targets(unet) if names is None else list(names)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        conv = getattr(parent, attr)
        new = MECondConv2d(conv, num_experts).to(device=conv.weight.device, dtype=conv.weight.dtype)
        setattr(parent, attr, new)
    logger.info("ME-CondConv (%d experts) in %d convolutions", num_experts, len(names))
    return names


def write_condconv_record(folder: Path, names: list[str], num_experts: int) -> None:
    (Path(folder) / CONDCONV_FILE).write_text(json.dumps({"names": names, "num_experts": num_experts}, indent=1) + "\n")


def read_condconv_record(folder: Path) -> dict | None:
    path = Path(folder) / CONDCONV_FILE
    return json.loads(path.read_text()) if path.is_file() else None
