"""The trial log: one JSON line per measured candidate, so a stopped search continues where it was."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

__all__ = ["TrialLog", "TrialLogMismatch", "LOG_NAME", "digest", "weights_digest"]

logger = logging.getLogger(__name__)

LOG_NAME = "trials.jsonl"


def _feed(h: Any, x: Any) -> None:
    if isinstance(x, torch.Tensor):  # contents, not the (truncated) repr
        h.update(f"tensor{tuple(x.shape)}{x.dtype}".encode())
        h.update(x.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(x, dict):
        for k in sorted(x, key=str):
            h.update(repr(k).encode())
            _feed(h, x[k])
    elif isinstance(x, (list, tuple)):
        h.update(f"{type(x).__name__}{len(x)}".encode())
        for v in x:
            _feed(h, v)
    elif callable(getattr(x, "tobytes", None)):  # numpy arrays, PIL images
        h.update(f"{type(x).__name__}{getattr(x, 'shape', getattr(x, 'size', ''))}".encode())
        h.update(x.tobytes())
    else:
        text = repr(x)
        h.update((type(x).__name__ if " at 0x" in text else text).encode())  # no memory addresses


def digest(inputs: list[Any]) -> str:
    """A short fingerprint of a list of inputs (prompts, call-argument dicts, token tensors, images),
    kept in the log's header so a continued search never mixes trials measured on other inputs."""
    h = hashlib.sha256()
    _feed(h, inputs)
    return h.hexdigest()[:16]


_SAMPLE = 4096  # elements hashed per tensor: its first, its last and a strided sample between


def weights_digest(model: Any) -> str:
    """A short fingerprint of a model's weights (a ``torch.nn.Module``, or a pipeline's module
    components), kept in the log's header so a search is never continued on retrained or other
    weights of the same architecture. Per tensor: name, shape, dtype and a sample of its values
    (the first, the last and a strided sample of :data:`_SAMPLE` elements), so a large model is
    fingerprinted in a fraction of a second."""
    if isinstance(model, torch.nn.Module):
        modules = {"": model}
    else:
        parts = getattr(model, "components", None)
        modules = {k: v for k, v in (parts.items() if isinstance(parts, dict) else ()) if isinstance(v, torch.nn.Module)}
    sampled: dict[str, Any] = {}
    for prefix in sorted(modules):
        for name, t in modules[prefix].state_dict(keep_vars=False).items():
            if not isinstance(t, torch.Tensor) or t.is_meta:
                continue
            flat = t.detach().reshape(-1)
            if flat.numel() > 3 * _SAMPLE:
                step = flat.numel() // _SAMPLE
                flat = torch.cat([flat[:_SAMPLE], flat[::step][:_SAMPLE], flat[-_SAMPLE:]])
            sampled[f"{prefix}.{name}"] = (tuple(t.shape), flat)
    return digest([sampled])


class TrialLogMismatch(ValueError):
    """The out folder's trial log belongs to another tuning run."""


class TrialLog:
    """Append-only JSON lines in ``folder/trials.jsonl``: a header (what is being tuned), then one
    record per trial. A header that differs from this run's refuses to continue the log."""

    def __init__(self, folder: str | Path | None, header: dict[str, Any]) -> None:
        self.path = Path(folder) / LOG_NAME if folder is not None else None
        self.header = json.loads(json.dumps(header, default=str))
        self.records: list[dict[str, Any]] = []
        if self.path is None:
            return
        if self.path.is_file():
            lines = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            if not lines or lines[0].get("header") != self.header:
                raise TrialLogMismatch(
                    f"{self.path} logs another tuning run (other model or weights, inputs, metric or seed); tune into "
                    "another out folder, or delete the log to start over")
            self.records = lines[1:]
            logger.info("continuing %s: %d trials logged", self.path, len(self.records))
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"header": self.header}) + "\n")

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record, default=str) + "\n")

    def find(self, kind: str, key: str) -> dict[str, Any] | None:
        """The logged record of ``kind`` (``"trial"``, ``"fixed"``, ``"held_out"``) for a candidate key."""
        for r in self.records:
            if r.get("kind") == kind and r.get("key") == key:
                return r
        return None
