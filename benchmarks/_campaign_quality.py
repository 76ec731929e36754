"""Quality beside every speed figure of ``gpu_campaign.py``: the zoo model's figure for the same technique.

The campaign's models have random weights, so its rows give speed only. Issue 33 asks for each speed
figure to be paired with the quality the technique has on its zoo model (trained weights, the same
config where one was measured). :func:`annotate` adds a ``quality`` field to every row at report time,
read from the committed results in ``benchmarks/results/`` (nothing is copied here): the zoo model, the
figure, the config it was measured at (as that file names it, so a config that differs from the row's
shows) and the file it came from. A technique with no zoo figure says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness

__all__ = ["SOURCES", "annotate", "cell", "describe"]


@dataclass(frozen=True)
class Source:
    """Where a technique's zoo figure is: a results file, the zoo model, the row's fields, the metrics shown, and
    the campaign models (name prefixes) it stands for (empty: all)."""

    file: str
    zoo_model: str
    select: tuple[tuple[str, Any], ...]
    metrics: tuple[str, ...]
    models: tuple[str, ...] = ()


_AGREE = ("decode_agreement", "free_running_agreement")
_LM = ("agreement", "exact_match")
_VLM = ("answer_agreement", "accuracy", "accuracy_delta")
_IMG = ("psnr", "ssim", "fid")
_UNET, _DIT = ("sd15",), ("flux", "wan")  # campaign diffusion models: SD 1.5's UNet; the transformers


def _layer_skip(config: str) -> Source:
    return Source("llm_layer_skip_stdlib-lm.json", "stdlib-lm", (("config", config), ("batch", 1)), _AGREE)


def _overhead(technique: str, zoo: str, metrics: tuple[str, ...], models: tuple[str, ...] = ()) -> Source:
    return Source("overhead.json", zoo, (("technique", technique), ("model", zoo)), metrics, models)


def _dit(method: str) -> Source:
    return Source("diffusion_dit.json", "digits-dit", (("method", method),), _IMG, _DIT)


def _sd(method: str) -> Source:
    return Source("diffusion_sd.json", "digits-sd", (("method", method),), _IMG, _UNET)


# campaign technique -> where its zoo figure is, first match wins
SOURCES: dict[str, tuple[Source, ...]] = {
    "unified s=2": (_layer_skip("unified s=2"),),
    "unified s=1.5": (_layer_skip("unified s=1.5"),),
    "FFN-SkipLLM 25% (forced)": (_layer_skip("ffn-skip 25% (forced)"),),
    "FFN-SkipLLM (default)": (_overhead("ffn_skip", "stdlib-lm", _LM),),
    "void layers": (_overhead("void_layers", "stdlib-lm", _LM),),
    "SWIFT r=0.45": (_overhead("self_speculative", "stdlib-lm-skip", _LM),),
    "p-MoD (default: progressive, attention)": (_overhead("pmod", "digits-llava", _VLM),),
    "VideoLLM-MoD (default: r=0.2)": (_overhead("videomod", "digits-video", _VLM),),
    "MuE (default thresholds)": (_overhead("mue", "digits-florence", _VLM),),
    "mmskip FI every 2": (_sd("mmskip fi=interval:2"), _overhead("feature_inheritance", "digits-dit", ("psnr", "ssim"), _DIT)),
    "mmskip FI every 3": (_sd("mmskip fi=interval:3"), _dit("mmskip fi=interval:3 targets=all")),
    "mmskip FI adaptive 0.1": (_sd("mmskip fi=adaptive:0.1"), _dit("mmskip fi=adaptive:0.1 targets=deep")),
    "diffusers FirstBlockCache 0.05": (_dit("diffusers FirstBlockCache 0.05"),),
    "diffusers FirstBlockCache 0.1": (_dit("diffusers FirstBlockCache 0.1"),),  # on the UNet: an error row
    "diffusers MagCache 0.06": (_dit("diffusers MagCache 0.06"),),
    "diffusers MagCache 0.12": (_dit("diffusers MagCache 0.12"),),
    "diffusers TaylorSeer interval 3": (_dit("diffusers TaylorSeerCache interval 3"),),
    "cache-dit DBCache F1B0 0.08": (_dit("cache-dit DBCache F1B0 0.08"),),
    "cache-dit DBCache F1B0 0.16": (_dit("cache-dit DBCache F1B0 0.16"),),
    "cache-dit DBCache F1B0 0.16 + TaylorSeer": (_dit("cache-dit DBCache F1B0 0.16 + TaylorSeer"),),
}
REFERENCE = ("plain", "baseline", "baseline (again)", "(build)", "(section)", "(collect)", "(all)")


def _rows(data: dict[str, Any], zoo: str) -> list[dict[str, Any]]:
    """A results file's rows: top-level ``rows`` (overhead, llm_layer_skip) or ``models[zoo].rows`` (diffusion)."""
    if "rows" in data:
        return data["rows"]
    return data.get("models", {}).get(zoo, {}).get("rows", [])


def _figure(row: dict[str, Any], metrics: tuple[str, ...]) -> str:
    values = row["quality"] if isinstance(row.get("quality"), dict) else row
    return ", ".join(f"{k} {values[k]:.3g}" for k in metrics if isinstance(values.get(k), (int, float)))


def describe(technique: str, model: str, results: Path = harness.RESULTS,
             cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``quality`` field of one campaign row (``technique`` on campaign model ``model``)."""
    if technique in REFERENCE:
        return {"figure": None, "note": "reference row (no skipping)"}
    if technique.startswith("attention backend"):
        return {"figure": None, "note": "not a skipping technique: the row's checks are output equalities"}
    cache = {} if cache is None else cache
    sources = [s for s in SOURCES.get(technique, ()) if not s.models or model.startswith(s.models)]
    for s in sources:
        if s.file not in cache:
            path = results / s.file
            cache[s.file] = json.loads(path.read_text()) if path.exists() else None
        data = cache[s.file]
        if data is None:
            continue
        row = next((r for r in _rows(data, s.zoo_model) if all(r.get(k) == v for k, v in s.select)), None)
        figure = _figure(row, s.metrics) if row else ""
        if figure:
            config = row.get("default_label") or row.get("config") or row.get("method")
            return {"zoo_model": s.zoo_model, "figure": figure, "config": config,
                    "source": f"benchmarks/results/{s.file}"}
    where = ", ".join(sorted({s.file for s in sources})) or "no results file holds one"
    return {"figure": None, "note": f"no zoo-model figure for this technique here ({where})"}


def annotate(rows: list[dict[str, Any]], results: Path = harness.RESULTS) -> None:
    """Add the ``quality`` field to every row (in place), read from ``results`` now."""
    cache: dict[str, Any] = {}
    for r in rows:
        r["quality"] = describe(str(r.get("technique", "")), str(r.get("model", "")), results, cache)


def cell(q: dict[str, Any] | None) -> str:
    """A row's quality in the report's table."""
    if not q:
        return "-"
    if q.get("figure") is None:
        return q.get("note", "-").replace("|", "/")
    return f"{q['zoo_model']}: {q['figure']} [{q['config']}; {Path(q['source']).name}]".replace("|", "/")
