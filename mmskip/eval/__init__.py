"""Quality metrics: FID, CLIP score, fidelity (PSNR/SSIM), conditional accuracy, perplexity, agreement.

CLI: ``python -m mmskip.eval images ...`` and ``python -m mmskip.eval lm ...`` (see ``__main__``).
"""

from __future__ import annotations

from .accuracy import classify, conditional_accuracy
from .clip_score import clip_score, clip_similarity, load_clip
from .decode_agreement import decode_agreement
from .fid import ClassifierFeatures, fid, make_fid
from .fidelity import psnr, ssim
from .language import agreement, greedy_generate, perplexity

__all__ = ["ClassifierFeatures", "agreement", "decode_agreement", "classify", "clip_score", "clip_similarity", "conditional_accuracy",
           "fid", "greedy_generate", "load_clip", "make_fid", "perplexity", "psnr", "ssim"]
