"""Training data: fixed-length windows of one token stream (causal LMs), and resuming a batch stream."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch

from mmskip.eval.lm import token_stream  # the held-out stream and training streams tokenize alike

__all__ = ["TokenWindows", "FixedWindows", "token_stream", "skip_batches"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


def skip_batches(batches: Iterable[T], start: int) -> Iterator[T]:
    """``batches`` read once from item ``start`` on (a resumed run skips what the first run used)."""
    it = iter(batches)
    for i in range(start):
        if next(it, None) is None:
            raise ValueError(f"batches ran out after {i} of the {start} batches a resumed run skips")
    return it


class TokenWindows:
    """Random ``seq_len``-token windows of a 1-D token stream.

    The windows of step ``t`` are drawn from a generator seeded by ``(seed, t)``, so a run resumed
    at step ``t`` sees the same windows an uninterrupted run would.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, name: str = "training data") -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.is_floating_point():
            raise TypeError(f"{name} must be a 1-D integer tensor of token ids (see mmskip.train.token_stream)")
        if len(tokens) < seq_len + 1:
            raise ValueError(f"{name} has {len(tokens)} tokens; a {seq_len}-token window needs at least "
                             f"{seq_len + 1}. Give more text or a smaller seq_len.")
        self.tokens, self.seq_len, self.name = tokens, seq_len, name

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, step: int, size: int, seed: int = 0) -> torch.Tensor:
        """``(size, seq_len)`` windows for optimizer step ``step``."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.tokens) - self.seq_len + 1, (size,), generator=g)
        return torch.stack([self.tokens[s : s + self.seq_len] for s in starts.tolist()])

    def ordered(self, n: int) -> torch.Tensor:
        """The first ``n`` non-overlapping windows (a fixed evaluation set); fewer if the stream is short."""
        n = min(n, len(self.tokens) // self.seq_len)
        return self.tokens[: n * self.seq_len].view(n, self.seq_len)


class FixedWindows:
    """Batches drawn (with replacement) from a fixed ``(n, seq_len)`` tensor of windows, seeded per
    step like :class:`TokenWindows`."""

    def __init__(self, windows: torch.Tensor, name: str = "training data") -> None:
        if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.is_floating_point():
            raise TypeError(f"{name} must be a 2-D integer tensor (n windows, seq_len) of token ids")
        if windows.shape[0] < 1 or windows.shape[1] < 2:
            raise ValueError(f"{name} has shape {tuple(windows.shape)}; give at least one window of 2+ tokens")
        self.windows, self.seq_len, self.name = windows, windows.shape[1], name

    def __len__(self) -> int:
        return self.windows.numel()

    def batch(self, step: int, size: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        return self.windows[torch.randint(0, len(self.windows), (size,), generator=g)]

    def ordered(self, n: int) -> torch.Tensor:
        return self.windows[:n]
