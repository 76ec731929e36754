"""Fidelity to the unaccelerated output: PSNR and SSIM (torchmetrics), images in [0, 1]."""

from __future__ import annotations

import torch

__all__ = ["psnr", "ssim"]


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean per-image PSNR in dB of ``pred`` vs ``target`` (N, C, H, W) in [0, 1]."""
    from mmskip.optional_deps import require

    peak_signal_noise_ratio = require("torchmetrics.functional.image", "PSNR").peak_signal_noise_ratio
    vals = peak_signal_noise_ratio(pred.float(), target.float(), data_range=1.0, reduction="none", dim=(1, 2, 3))
    return float(vals.clamp(max=100.0).mean())


def ssim(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean SSIM of ``pred`` vs ``target`` (N, C, H, W) in [0, 1]."""
    from mmskip.optional_deps import require

    structural_similarity_index_measure = require("torchmetrics.functional.image",
                                                  "SSIM").structural_similarity_index_measure
    return float(structural_similarity_index_measure(pred.float(), target.float(), data_range=1.0))
