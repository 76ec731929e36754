"""The one "skip this layer / sublayer" hook, shared by every technique that skips decoder units.

``SkipUnitHook`` replaces a layer's, attention's or MLP's forward by what the adapter says a
skipped unit returns (:meth:`mmskip.registry.DecoderAdapter.skipped`) whenever its ``when()``
predicate is true, and runs the unit unchanged otherwise. The SWIFT draft and the depth
analysis use it directly; layer skipping adds its KV-cache rule on top.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.hooks import ModelHook

from .registry import DecoderAdapter

__all__ = ["SkipUnitHook"]


class SkipUnitHook(ModelHook):
    """Skip ``adapter.unit(kind, index)`` while ``when()`` is true (``on_skip(hidden)`` is told)."""

    def __init__(
        self,
        adapter: DecoderAdapter,
        kind: str,
        index: int,
        when: Callable[[], bool],
        on_skip: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        super().__init__()
        adapter.unit(kind, index)  # validates kind and index
        self.adapter, self.kind, self.index, self.when, self.on_skip = adapter, kind, index, when, on_skip

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not self.when():
            return self.fn_ref.original_forward(*args, **kwargs)
        if self.on_skip is not None:
            self.on_skip(args[0] if args else next(iter(kwargs.values())))
        return self.adapter.skipped(self.kind, args, kwargs)
