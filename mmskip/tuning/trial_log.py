"""The trial log: one JSON line per measured candidate, so a stopped search continues where it was."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

__all__ = ["TrialLog", "TrialLogMismatch", "LOG_NAME"]

logger = logging.getLogger(__name__)

LOG_NAME = "trials.jsonl"


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
                    f"{self.path} logs another tuning run (other model, inputs, metric or seed); tune into "
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
