"""A training-only running tally for ``digits-video``'s language model: the aggregation its questions need.

The multi-frame questions (how many frames show D, which frame shows D first, is D in the video) need
the model to aggregate over up to 8 frames, and one answer a question is a thin signal for that. This
auxiliary gives it a dense one: a linear head (not saved) on the language model's hidden state at the last
token of each frame, after :data:`LAYER` layers, predicts for every digit 0-9 how many frames up to and
including that one show it (0-8), and which frame showed it first (0 = none yet, else 1-8). The later
layers then only have to read the tally of the video's last frame.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmskip.zoo import video_data as D

__all__ = ["LAYER", "CLASSES", "OUTPUTS", "tally_targets", "vision_positions", "frame_ends", "tally_loss"]

LAYER = 3  # hidden_states[LAYER]: the output of the language model's 3rd layer (of 6)
CLASSES = D.MAX_CLIPS * D.FRAMES + 1  # counts 0-8; first frame 0 (none yet) or 1-8
OUTPUTS = 2 * 10 * CLASSES  # (count, first) × digit × class


def tally_targets(videos: D.Videos) -> torch.Tensor:
    """``(n, frames, 2, 10)``: after each of a video's frames (all videos have the same number of clips),
    for each digit, how many frames so far show it and which frame (1-based) showed it first (0: none yet)."""
    c = int(videos.n_clips[0])
    if not bool((videos.n_clips == c).all()):
        raise ValueError("tally targets need videos with the same number of clips")
    labels = videos.labels[:, :c].flatten(1)  # (n, T)
    hit = labels[:, :, None] == torch.arange(10)  # (n, T, 10)
    count = hit.long().cumsum(1)
    t = torch.arange(1, labels.shape[1] + 1)[None, :, None]
    first_at = torch.where(hit, t, torch.full_like(t, CLASSES)).cummin(1).values  # CLASSES: not seen yet
    first = first_at.masked_fill(first_at == CLASSES, 0)
    return torch.stack([count, first], dim=2)


def vision_positions(n_clips: int, prefix: int) -> torch.Tensor:
    """Positions of the frames' vision tokens (not the clips' newline tokens) in a prompt whose clips start
    after ``prefix`` tokens, frame by frame."""
    clip = torch.arange(n_clips)[:, None] * D.N_CLIP_TOKENS
    return (prefix + clip + torch.arange(D.FRAMES * D.TOKENS_PER_FRAME)[None]).flatten()


def frame_ends(n_clips: int, prefix: int) -> torch.Tensor:
    """Positions, in a prompt whose clips start after ``prefix`` tokens, of each frame's last vision token."""
    return vision_positions(n_clips, prefix)[D.TOKENS_PER_FRAME - 1::D.TOKENS_PER_FRAME]


def tally_loss(head: torch.nn.Module, hidden: torch.Tensor, ends: torch.Tensor, targets: torch.Tensor
               ) -> torch.Tensor:
    """Cross-entropy of ``head`` on ``hidden`` ``(n, L, d)`` at positions ``ends`` against ``targets``
    (:func:`tally_targets`), averaged over frames, digits and the two tallies."""
    logits = head(hidden[:, ends]).float().view(*targets.shape, CLASSES)
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten())
