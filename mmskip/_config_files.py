"""``mmskip_skip_config.json``: several configs applied together, as one file in a folder.

A Skip pipeline's ``save_pretrained`` and :meth:`mmskip.tuning.TuneResult.save` both write it; a
Skip pipeline's ``from_pretrained`` and :func:`mmskip.pipelines.load_skip_configs` read it. Configs
that read a file (the Gaussian teleport's statistics) copy it into the folder on the way in
(``SkipConfig.saved_in``) and resolve it on the way out (``SkipConfig.loaded_from``), so the folder
loads from anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .inject import SkipConfig

__all__ = ["SKIP_CONFIG_NAME", "write_configs", "read_configs"]

SKIP_CONFIG_NAME = "mmskip_skip_config.json"


def write_configs(configs: Sequence[SkipConfig], folder: str | Path) -> Path:
    """Write ``configs`` to ``folder/mmskip_skip_config.json`` (files they read are copied in)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SKIP_CONFIG_NAME
    path.write_text(json.dumps({"configs": [c.saved_in(folder).to_dict() for c in configs]}, indent=2) + "\n")
    return path


def read_configs(path: str | Path) -> list[SkipConfig]:
    """The configs :func:`write_configs` wrote (``path``: the folder or the file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / SKIP_CONFIG_NAME
    if not p.is_file():
        raise FileNotFoundError(f"no {SKIP_CONFIG_NAME} at {p.parent}; write one with a Skip pipeline's "
                                "save_pretrained(folder) or a tuning result's save(folder)")
    data = json.loads(p.read_text())
    return [SkipConfig.from_dict(d).loaded_from(p.parent) for d in data["configs"]]
