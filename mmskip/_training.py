"""Pieces every resumable trainer here shares (p-MoD routers, MuE layer-wise training)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch

__all__ = ["skip_batches", "save_checkpoint"]

T = TypeVar("T")


def skip_batches(batches: Iterable[T], start: int) -> Iterator[T]:
    """``batches`` read once from item ``start`` on (a resumed run skips what the first run used)."""
    it = iter(batches)
    for i in range(start):
        if next(it, None) is None:
            raise ValueError(f"batches ran out after {i} of the {start} batches a resumed run skips")
    return it


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file, then rename: a run killed mid-write leaves the old checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
