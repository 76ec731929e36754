"""Start a SkipPipe job with ``torchrun`` (one process per node) and read its result."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from .config import SkipPipeConfig
from .runtime import TrainSpec

__all__ = ["launch", "cli_args", "SkipPipeJobError"]


class SkipPipeJobError(RuntimeError):
    """A rank failed (torchrun stopped the others); the message holds the job's output tail."""


def cli_args(cfg: SkipPipeConfig, spec: TrainSpec) -> list[str]:
    """Command-line arguments of ``python -m mmskip.train.skippipe`` for ``cfg`` and ``spec``."""
    args: list[str] = []
    for obj in (cfg, spec):
        for f in fields(obj):
            v = getattr(obj, f.name)
            if v is None:
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(v, bool):
                args.append(flag if v else "--no-" + f.name.replace("_", "-"))
            elif isinstance(v, tuple):
                args += [flag, *[str(x) for x in v]]
            else:
                args += [flag, str(v)]
    return args


def launch(cfg: SkipPipeConfig, spec: TrainSpec, timeout_s: float = 600, env: dict | None = None) -> dict[str, Any]:
    """Run the job with ``torchrun --standalone`` and return rank 0's record (``spec.out`` required).

    Raises :class:`SkipPipeJobError` with the job's output when a rank fails, and
    ``subprocess.TimeoutExpired`` when the job outlives ``timeout_s``.
    """
    if spec.out is None:
        raise ValueError("launch needs spec.out: the folder rank 0 writes result.json to")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.world_size}",
           "-m", "mmskip.train.skippipe", *cli_args(cfg, spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    if proc.returncode != 0:
        out = proc.stdout + proc.stderr
        cause = out[out.find("Root Cause"):] if "Root Cause" in out else ""
        tail = out[-3000:] if cause and cause in out[-3000:] else out[-3000:] + ("\n" + cause if cause else "")
        raise SkipPipeJobError(f"the SkipPipe job failed (exit {proc.returncode}):\n{tail}")
    return json.loads((Path(spec.out) / "result.json").read_text())


