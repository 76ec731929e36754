"""Resumable checkpoints: trainable weights and optimizer tensors as safetensors, the rest as JSON.

The one checkpoint format of the project's trainers (``mmskip.train``, the p-MoD router and MuE
layer-wise trainers, RelaCtrl's control branch, assembly distillation): ``folder/checkpoint/``
holds ``trainable.safetensors`` (the weights the trainer names), ``optimizer.safetensors`` (its
tensors) and ``trainer_state.json`` (step, the trainer's own fields, optimizer scalars and
parameter groups, scheduler state). JSON turns tuples into lists: a trainer comparing saved
fields compares them as they come back.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["fingerprint", "save_checkpoint", "load_checkpoint", "weights_under", "legacy_note", "CHECKPOINT_DIR",
           "STATE_PATH"]

CHECKPOINT_DIR = "checkpoint"
_WEIGHTS, _OPTIM, _STATE = "trainable.safetensors", "optimizer.safetensors", "trainer_state.json"
STATE_PATH = f"{CHECKPOINT_DIR}/{_STATE}"  # under the run's folder: the file whose presence marks a checkpoint


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """The model's class and a hash of its parameter names and shapes (what a checkpoint must match)."""
    lines = [f"{n}:{tuple(p.shape)}" for n, p in model.named_parameters()]
    return {"class": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "shape_hash": hashlib.sha1("\n".join(lines).encode()).hexdigest()[:16]}


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _unshared(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies safetensors can write: tensors sharing storage (tied embeddings) are cloned apart."""
    out, seen = {}, set()
    for k, v in weights.items():
        t = v.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        out[k] = t.clone() if ptr is not None and ptr in seen else t
        seen.add(ptr)
    return out


def save_checkpoint(folder: Path, step: int, weights: dict[str, torch.Tensor], optimizer: Any, scheduler: Any,
                    meta: dict[str, Any]) -> Path:
    """Write ``folder/checkpoint/`` atomically (a temporary folder renamed over the old one).

    ``scheduler`` may be ``None`` (a trainer that sets the learning rate itself); ``meta`` holds the
    trainer's JSON-able fields (``"model"``: a :func:`fingerprint` that :func:`load_checkpoint` checks).
    """
    final = Path(folder) / CHECKPOINT_DIR
    tmp = final.with_name(CHECKPOINT_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_unshared(weights), str(tmp / _WEIGHTS))
    tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, str(tmp / _OPTIM))
    state = {"step": step, **meta, "optimizer": opt_meta,
             "scheduler": scheduler.state_dict() if scheduler is not None else None}
    (tmp / _STATE).write_text(json.dumps(state, indent=1, default=str) + "\n")
    old = final.with_name(CHECKPOINT_DIR + ".old")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(folder: Path, model_print: dict[str, Any] | None = None,
                    ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]] | None:
    """``(trainer_state, weights, optimizer_state)`` from ``folder/checkpoint``, or ``None`` if there
    is none. Raises ``ValueError`` if it was written for another model (checked when ``model_print``
    is given; a trainer that checks its own fields passes ``None``)."""
    ckpt = Path(folder) / CHECKPOINT_DIR
    if not (ckpt / _STATE).exists():
        return None
    state = json.loads((ckpt / _STATE).read_text())
    if model_print is not None and state.get("model") != model_print:
        raise ValueError(f"the checkpoint in {ckpt} was written for {state.get('model')}, but this model is "
                         f"{model_print}. Resume with the model it was trained from, or train into another folder.")
    optim = _unflatten_optimizer(load_file(str(ckpt / _OPTIM)), state["optimizer"])
    return state, load_file(str(ckpt / _WEIGHTS)), optim


def weights_under(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``weights`` named ``prefix + key``, as ``key`` (a trainer that checkpoints several
    modules names each module's weights with its own prefix)."""
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def legacy_note(folder: Path) -> str:
    """``""``, or a sentence to append to a "no checkpoint" error when ``folder`` holds a
    ``checkpoint.pt``: the torch.save checkpoints the p-MoD and MuE trainers wrote before this format."""
    if (Path(folder) / "checkpoint.pt").is_file():
        return (f"; {str(folder)!r} holds checkpoint.pt, written by an earlier mmskip (torch.save) that this one no "
                "longer reads: finish that run with the version that wrote it, or start anew")
    return ""
