"""CLIP score with an open_clip model: the zoo's ``digits-clip`` or any local open_clip model."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["load_clip", "clip_score", "clip_similarity"]


def load_clip(spec: str = "digits-clip") -> tuple[Any, Any, Any]:
    """``(model, preprocess, tokenizer)``. ``spec`` is ``"digits-clip"`` or ``"ARCH:CHECKPOINT"`` for open_clip."""
    if spec == "digits-clip":
        from mmskip.zoo import load

        return load("digits-clip")
    from mmskip.optional_deps import require

    open_clip = require("open_clip", "CLIP score")
    arch, _, ckpt = spec.partition(":")
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=ckpt or None)
    return model.eval(), preprocess, open_clip.get_tokenizer(arch)


def _normalize_stats(preprocess: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    for t in getattr(preprocess, "transforms", []):
        if hasattr(t, "mean") and hasattr(t, "std"):
            return tuple(t.mean), tuple(t.std)
    return (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@torch.no_grad()
def clip_similarity(images: torch.Tensor, captions: list[str], clip: tuple[Any, Any, Any] | None = None,
                    batch_size: int = 256) -> torch.Tensor:
    """Cosine similarity of each image (N, C, H, W in [0, 1]) with its caption (length N)."""
    model, preprocess, tokenizer = clip if clip is not None else load_clip()
    model.eval()
    size = model.visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    mean, std = _normalize_stats(preprocess)
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].float().cpu()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
        x = ((x - mean_t) / std_t).to(device, dtype)
        img = F.normalize(model.encode_image(x).float(), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(captions[i:i + batch_size]).to(device)).float(), dim=-1)
        out.append((img * txt).sum(-1).cpu())
    return torch.cat(out)


def clip_score(images: torch.Tensor, captions: list[str], clip: tuple[Any, Any, Any] | None = None) -> float:
    """CLIP score (Hessel et al.): mean of ``100 * max(cos(image, caption), 0)``."""
    return float((100 * clip_similarity(images, captions, clip).clamp(min=0)).mean())
