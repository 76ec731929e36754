"""Count the tensor reads that make the host wait for the device.

On a GPU every ``.item()``, ``.tolist()``, ``if tensor:``, ``float(tensor)`` or data-dependent shape
(``nonzero``, boolean-mask indexing) stalls the CPU until the queued kernels finish, so a skipping
technique that reads a decision back per layer loses much of what it skips.
``torch.cuda.set_sync_debug_mode("warn")`` reports such syncs on a GPU; :class:`HostReads` counts
the same reads on any device (CPU included), so a test can show that a technique reads back
per token, not per layer.

Example::

    from mmskip.analysis import HostReads

    with HostReads() as reads:
        model.generate(ids, max_new_tokens=8)
    print(reads.total, reads.by_op)      # e.g. 9 {'item': 8, '__bool__': 1}
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["HostReads", "READ_OPS"]

# Tensor methods / functions whose result needs the tensor's values on the host (a device sync on CUDA)
READ_OPS = frozenset({"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "nonzero",
                      "masked_select", "unique", "unique_consecutive", "argwhere", "equal"})


def _name(func: Any) -> str:
    return getattr(func, "__name__", str(func))


def _bool_mask(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class HostReads(TorchFunctionMode):
    """A context manager counting host reads of tensor values (see the module docstring).

    Counted: :data:`READ_OPS`, ``.cpu()`` / ``.to("cpu")`` of a tensor on another device, and indexing
    with a boolean mask (its result's shape depends on the values). ``by_op`` maps each to its count.
    """

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = _name(func)
        if name in READ_OPS:
            self.by_op[name] += 1
        elif name in ("__getitem__", "__setitem__") and len(args) > 1 and _bool_mask(args[1]):
            self.by_op[f"{name}[bool mask]"] += 1
        elif name in ("cpu", "to") and args and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu":
            target = args[1] if len(args) > 1 else kwargs.get("device")
            if name == "cpu" or str(target).startswith("cpu"):
                self.by_op["to cpu"] += 1
        return func(*args, **kwargs)
