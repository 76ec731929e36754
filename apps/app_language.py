"""The app's Language and Analysis tabs: a completion with and without a technique, paired-timed,
and the depth report of a causal language model (the zoo's ``stdlib-lm`` pair or a local folder)."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from app_core import (
    DEFAULT_PAIRS,
    AppError,
    Progress,
    bound_cell,
    check_pairs,
    speed_cell,
    stage,
    timed,
    timing_note,
    warnings_md,
)

import mmskip
from mmskip import schedules, zoo

LM_TECHNIQUES = ["Unified Layer Skipping s=1.5", "Unified Layer Skipping s=2", "FFN-SkipLLM", "void layers",
                 "SWIFT (lossless)", "SWIFT + prompt lookup (lossless)"]
CHUNK_TOKENS = 64  # the Analysis tab's window


@functools.lru_cache(maxsize=1)
def _causal_lm_classes() -> frozenset[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def _architectures(folder: Path) -> list[str] | None:
    """The ``architectures`` a transformers folder declares, or None without a readable config.json."""
    try:
        return list(json.loads((folder / "config.json").read_text()).get("architectures") or [])
    except (OSError, ValueError, AttributeError):
        return None


def _is_causal_lm(folder: Path) -> bool:
    archs = _architectures(folder)
    return bool(archs) and any(a.endswith("ForCausalLM") or a in _causal_lm_classes() for a in archs)


def language_models() -> list[str]:
    """The zoo's causal language models (what the Language and Analysis tabs offer): every zoo
    folder whose config.json declares a causal-LM architecture, so diffusion and vision models
    never show up in the list."""
    return [n for n in zoo.NAMES if (zoo.MODELS_DIR / n / "config.json").is_file()
            and any(a.endswith("ForCausalLM") for a in _architectures(zoo.MODELS_DIR / n) or [])]


def check_language_model(name: str) -> str:
    """``name`` stripped, or an :class:`AppError` saying what the model field takes."""
    name = (name or "").strip()
    offered = ", ".join(language_models())
    if not name:
        raise AppError(f"the model field is empty: choose a zoo language model ({offered}) "
                       "or type the path of a local transformers causal-LM folder on the server")
    if name in zoo.NAMES:
        if name not in language_models():
            raise AppError(f"{name!r} is a zoo model but not a causal language model; this tab runs {offered} "
                           "or a local causal-LM folder")
        return name
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise AppError(f"{name!r} is neither a zoo language model ({offered}) nor a folder on the server")
    if not _is_causal_lm(folder):
        archs = _architectures(folder)
        what = f"declares {', '.join(archs)}" if archs else "has no config.json naming an architecture"
        raise AppError(f"{name!r} {what}: not a transformers causal language model (…ForCausalLM) folder")
    return str(folder)


@functools.lru_cache(maxsize=4)
def _lm(name: str) -> tuple[Any, Any]:
    from mmskip.eval.lm import load_lm

    return load_lm(name)


def lm_config(technique: str) -> mmskip.SkipConfig:
    """The config behind a Language-tab technique name."""
    if technique.startswith("Unified"):
        return mmskip.LayerSkipConfig(schedule=schedules.unified(float(technique.rsplit("=", 1)[1])))
    if technique == "FFN-SkipLLM":
        return mmskip.FFNSkipConfig()
    if technique == "void layers":
        return mmskip.VoidLayerConfig()
    if technique.startswith("SWIFT"):
        from mmskip.swift import SelfSpeculativeConfig

        return SelfSpeculativeConfig(prompt_lookup=(2, 4) if "lookup" in technique else None)
    raise AppError(f"unknown technique {technique!r}; choose one of {LM_TECHNIQUES}")


@torch.no_grad()
def run_language(model_name: str, prompt: str, technique: str, new_tokens: int = 48, pairs: int = DEFAULT_PAIRS,
                 progress: Progress = None) -> tuple[str, str, str]:
    """(plain completion, accelerated completion, markdown stats) for one prompt, batch 1; the speed
    is the median of ``pairs`` interleaved plain/accelerated pairs after a warm-up round."""
    check_pairs(pairs)
    if not prompt or not prompt.strip():
        raise AppError("the prompt is empty: type the start of some Python code")
    name = check_language_model(model_name)
    stage(progress, 0.02, f"loading {name}")
    model, tok = _lm(name)
    config = lm_config(technique)
    try:
        mmskip.apply(model, config).remove()  # does it fit this model? (cheap; before any timing)
    except (TypeError, ValueError) as e:
        raise AppError(f"{technique} does not fit {name}: {e}") from e
    ids = tok(prompt, return_tensors="pt").input_ids
    kwargs = dict(max_new_tokens=int(new_tokens), do_sample=False, pad_token_id=tok.eos_token_id)
    out: dict[str, Any] = {}

    def plain() -> None:
        out["plain"] = model.generate(ids, **kwargs)[0, ids.shape[1]:]

    def fast() -> None:
        with mmskip.applied(model, config) as handle:
            out["fast"] = model.generate(ids, **kwargs)[0, ids.shape[1]:]
            out["stats"] = handle.stats()

    t = timed(plain, {technique: fast}, pairs, progress, (0.1, 0.95),
              f"generating {int(new_tokens)} tokens, plain and with {technique}")[technique]
    stage(progress, 0.97, "comparing the outputs")
    plain_ids, fast_ids, stats = out["plain"], out["fast"], out["stats"]
    n = min(len(plain_ids), len(fast_ids))
    agree = float((plain_ids[:n] == fast_ids[:n]).float().mean()) if n else 1.0
    identical = torch.equal(plain_ids, fast_ids)
    badge = "**identical output** ✅" if identical else f"differs from plain (position-wise agreement {agree:.2f})"
    fraction = stats.get("flops_fraction")
    lines = [f"| | plain | {technique} |", "|---|---:|---:|",
             f"| tokens/s (median) | {len(plain_ids) / t.baseline_seconds:.1f} | {len(fast_ids) / t.seconds:.1f} |",
             f"| speedup (quartiles, pairs) | 1.00× | {speed_cell(t)} |",
             f"| FLOPs bound | 1.00× | {bound_cell(fraction)} |"]
    if "acceptance_rate" in stats:
        lines.append(f"| draft acceptance | - | {stats['acceptance_rate']:.2f} |")
    warn = warnings_md({technique: (t, fraction)})
    md = "\n".join(lines) + f"\n\n{badge}" + (f"\n\n{warn}" if warn else "") + f"\n\n{timing_note(t.pairs)}"
    return tok.decode(plain_ids, skip_special_tokens=True), tok.decode(fast_ids, skip_special_tokens=True), md


def run_analysis(model_name: str, text: str, progress: Progress = None) -> tuple[list[str], str]:
    """The depth report's plots (paths) and its text summary for ``text``."""
    from mmskip.analysis.cli import chunk_text, summary
    from mmskip.analysis.depth import depth_report

    if not text or len(text.strip()) < 40:
        raise AppError("paste some code or text to analyse (a few hundred characters at least)")
    name = check_language_model(model_name)
    stage(progress, 0.02, f"loading {name}")
    model, tok = _lm(name)
    stage(progress, 0.08, "splitting the text into windows")
    try:
        ids = chunk_text(tok, text, 4, CHUNK_TOKENS)
    except ValueError as e:
        raise AppError(f"the text is too short: the analysis needs at least {CHUNK_TOKENS} tokens; "
                       "paste a longer text") from e
    stage(progress, 0.1, f"analysing every layer on {ids.shape[0]} windows of {CHUNK_TOKENS} tokens")
    report = depth_report(model, ids, void_prompts=2, void_new_tokens=8)
    stage(progress, 0.9, "drawing the plots")
    paths = report.plot(tempfile.mkdtemp(prefix="mmskip-app-"))
    return [str(p) for p in paths], f"```\n{summary(report)}\n```"
