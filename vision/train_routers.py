"""Train p-MoD routers on a frozen vision-language model (optionally with LoRA adapters), then compare
held-out accuracy and prefill FLOPs with the unmodified model and the training-free signals.

    python -m mmskip.vision.train_routers --model digits-llava --out runs/pmod-routers --steps 300
    python -m mmskip.vision.train_routers --model digits-llava --out runs/r --lora          # routers + LoRA (peft)
    python -m mmskip.vision.train_routers --model digits-llava --out runs/r --steps 600 --resume

Training: fresh zero routers (``MoDRouters.for_model``) are attached with
``MoDConfig(signal="router")``, i.e. p-MoD's TanhNorm weights ``w = alpha * tanh(r) + 1`` and STRing
(kept vision tokens' MLP output x ``w``, skipped vision tokens ``w * h``); the applied hooks read
``handle.state.routers``, which is the module being optimised, so the language-model loss on the
answer tokens reaches the routers through ``w`` (the top-k choice itself has no gradient, as in
p-MoD). The base model is frozen: only the routers (and LoRA adapters on the language model's
q/v projections, with ``--lora``) learn. p-MoD instead trains the whole MLLM with its MoD layers
through pre-training and instruction tuning.

Output (``--out``): ``mod_routers.safetensors`` + ``mod_routers.json`` (load with
``MoDConfig(signal="router", routers=out)``), ``checkpoint.pt`` (routers, optimizer, step, losses
and any LoRA weights; ``--resume`` continues it), ``lora.safetensors`` + ``lora.json`` with
``--lora``, and ``eval.json`` (the table the command prints).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from mmskip.inject import SkipConfig, apply
from mmskip.registry import get_adapter

from .mod_routers import MoDRouters

__all__ = [
    "CHECKPOINT",
    "LORA_WEIGHTS",
    "LORA_META",
    "train_mod_routers",
    "default_lora_config",
    "merged_with_lora",
    "evaluate_configs",
    "main",
]

CHECKPOINT = "checkpoint.pt"
LORA_WEIGHTS = "lora.safetensors"
LORA_META = "lora.json"
PROG = "python -m mmskip.vision.train_routers"


# -- LoRA (peft) ---------------------------------------------------------------------------------


def _peft() -> Any:
    try:
        import peft
    except ModuleNotFoundError as e:
        from mmskip.eval._optional import missing_extra

        err = missing_extra(e, "training p-MoD routers with LoRA")
        if err is None:
            raise
        raise err from e
    return peft


def default_lora_config(model: nn.Module, r: int = 8, alpha: int = 16) -> Any:
    """peft ``LoraConfig`` for the q and v projections of ``model``'s language model (every decoder
    layer; the vision tower and projector are left alone). Targets are full module names."""
    names = {id(m): n for n, m in model.named_modules()}
    text = get_adapter(model, "vlm").text
    targets = []
    for i in range(text.num_layers):
        attn = text.attention(i)
        targets += [names[id(getattr(attn, p))] for p in ("q_proj", "v_proj") if hasattr(attn, p)]
    return _peft().LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=targets)


def _inject_lora(model: nn.Module, lora_config: Any) -> list[tuple[nn.Module, str, nn.Module]]:
    """Put LoRA layers into ``model`` in place (``peft.inject_adapter_in_model``); returns
    ``(parent, attribute, lora layer)`` per wrapped module, for :func:`_unwrap_lora`."""
    peft = _peft()
    from peft.tuners.lora import LoraLayer

    had = set(vars(model))
    peft.inject_adapter_in_model(lora_config, model)
    for key in set(vars(model)) - had:  # peft notes its config on the model (peft_config): not ours to keep
        delattr(model, key)
    found = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and hasattr(module, "base_layer"):
            parent_name, _, attr = name.rpartition(".")
            found.append((model.get_submodule(parent_name) if parent_name else model, attr, module))
    if not found:
        raise ValueError(f"the LoRA config's target_modules {lora_config.target_modules!r} match no module of the model")
    return found


def _unwrap_lora(layers: list[tuple[nn.Module, str, nn.Module]], merge: bool = False) -> None:
    """Put every wrapped module back (``merge``: with the LoRA update added to its weight first)."""
    for parent, attr, module in layers:
        if merge:
            module.merge()
        setattr(parent, attr, module.base_layer)


def _lora_params(layers: list[tuple[nn.Module, str, nn.Module]]) -> list[nn.Parameter]:
    return [p for _, _, m in layers for n, p in m.named_parameters() if "lora_" in n]


def _lora_named(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def merged_with_lora(model: nn.Module, folder: str | Path) -> nn.Module:
    """A copy of ``model`` with the LoRA adapters saved in ``folder`` (``lora.safetensors`` and
    ``lora.json``, written by :func:`train_mod_routers` with ``lora=``) merged into its weights: a plain
    model of the same class (``mmskip.apply`` works on it). ``model`` itself is not changed."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / LORA_WEIGHTS).is_file() or not (folder / LORA_META).is_file():
        raise FileNotFoundError(f"no LoRA adapters in {str(folder)!r} (expected {LORA_WEIGHTS} and {LORA_META})")
    info = json.loads((folder / LORA_META).read_text())
    merged = copy.deepcopy(model)
    cfg = _peft().LoraConfig(r=info["r"], lora_alpha=info["lora_alpha"], lora_dropout=0.0, bias="none",
                             target_modules=info["target_modules"])
    layers = _inject_lora(merged, cfg)
    ref = next(model.parameters())
    state = {k: v.to(device=ref.device, dtype=ref.dtype) for k, v in load_file(str(folder / LORA_WEIGHTS)).items()}
    missing = set(_lora_named(merged)) ^ set(state)
    if missing:
        raise ValueError(f"the LoRA weights in {str(folder)!r} do not fit this model: {sorted(missing)[:4]} ...")
    merged.load_state_dict(state, strict=False)
    with torch.no_grad():
        _unwrap_lora(layers, merge=True)
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged.eval()


# -- training ------------------------------------------------------------------------------------


def _stream(batches: Iterable[Mapping[str, Any]], start: int) -> Iterator[Mapping[str, Any]]:
    """Batches from step ``start`` on: a sequence is cycled; any other iterable is read once, its first
    ``start`` items skipped (so a resumed run sees what an uninterrupted one would have)."""
    if isinstance(batches, Mapping):
        raise TypeError("batches must yield dicts of model kwargs; for one batch pass [batch]")
    if isinstance(batches, Sequence):
        if not batches:
            raise ValueError("batches is empty")
        i = start
        while True:
            yield batches[i % len(batches)]
            i += 1
    it = iter(batches)
    for i in range(start):
        if next(it, None) is None:
            raise ValueError(f"batches ran out after {i} of the {start} batches a resumed run skips")
    yield from it


def _to(batch: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, dtype=dtype) if v.is_floating_point() else v.to(device)
        out[k] = v
    return out


def _curve(losses: list[float], points: int = 20) -> list[list[float]]:
    """``[[last step of the window, mean loss over the window], ...]`` (about ``points`` windows)."""
    if not losses:
        return []
    size = max(1, math.ceil(len(losses) / points))
    return [[min(s + size, len(losses)), round(sum(losses[s:s + size]) / len(losses[s:s + size]), 4)]
            for s in range(0, len(losses), size)]


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train_mod_routers(
    model: nn.Module,
    config: SkipConfig,
    batches: Iterable[Mapping[str, Any]],
    *,
    steps: int = 300,
    lr: float = 1e-3,
    out: str | Path,
    resume: bool = False,
    lora: Any = None,
    checkpoint_every: int = 50,
    clip: float | None = 1.0,
    progress: bool = True,
    meta: Mapping[str, Any] | None = None,
) -> MoDRouters:
    """Train p-MoD routers for ``config``'s MoD layers on the frozen ``model``; returns them (also saved).

    ``config`` is any MoD-style config with ``schedule``, ``signal`` and ``routers`` fields that reads
    :class:`MoDRouters` (``MoDConfig``; a video variant with the same fields works the same way): it is
    applied as ``dataclasses.replace(config, signal="router", routers=...)`` with fresh zero routers
    (``MoDRouters.for_model``, float32), and the handle's ``state.routers`` is set to the module being
    optimised. Each step runs ``model(**batch)`` (``use_cache=False`` unless the batch says otherwise)
    and minimises its ``.loss``: ``batches`` yields dicts of model keyword arguments including
    ``labels`` (-100 except the answer tokens), moved to the model's device and float dtype. A
    :class:`~collections.abc.Sequence` of batches is cycled; another iterable must yield ``steps``
    batches (a resumed run skips the ones already used).

    Only the routers train (AdamW, ``lr``, no weight decay, gradient norm clipped to ``clip``), plus
    LoRA adapters when ``lora`` is ``True`` (rank 8 on the language model's q/v projections, see
    :func:`default_lora_config`) or a peft ``LoraConfig``. LoRA layers are injected in place
    (``peft.inject_adapter_in_model``) *after* ``mmskip.apply`` (so the handle's FLOP costs are the
    base model's) and taken out again at the end; their weights go to ``out/lora.safetensors``
    (:func:`merged_with_lora` gives a model with them merged).

    Every ``checkpoint_every`` steps and at the end, ``out/checkpoint.pt`` holds the routers, the
    optimizer, the step, the losses and any LoRA weights; ``resume=True`` continues from it up to
    ``steps`` in all, at this call's ``lr`` (``FileNotFoundError`` without a checkpoint, ``ValueError``
    when its schedule or LoRA setting differs). The final routers are written with
    ``MoDRouters.save(out, ...)`` (metadata: steps, lr, schedule, MoD layers, loss curve, LoRA,
    ``meta``) and their ``.meta`` holds the same. When it returns (or raises), the model is as it
    was: hooks removed, LoRA layers out, ``requires_grad`` flags and train/eval mode restored, base
    weights untouched.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    fields = {f.name for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else set()
    if not isinstance(config, SkipConfig) or not {"signal", "routers", "schedule"} <= fields:
        raise TypeError(
            f"train_mod_routers needs a MoD config with schedule/signal/routers fields (e.g. mmskip.vision.MoDConfig), "
            f"got {type(config).__name__}"
        )
    out = Path(out)
    ckpt_path = out / CHECKPOINT
    state: dict[str, Any] | None = None
    if resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(
                f"resume: no checkpoint in {str(out)!r} (expected {CHECKPOINT}); start without resume to train "
                "from scratch"
            )
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)

    ref = next(model.parameters())
    device, dtype = ref.device, ref.dtype
    routers = MoDRouters.for_model(model, config).to(device=device, dtype=torch.float32)
    schedule = config.schedule.to_dict()
    if state is not None:
        if state["layers"] != routers.layers or state.get("schedule", schedule) != schedule:
            raise ValueError(
                f"the checkpoint in {str(out)!r} was trained with schedule {state.get('schedule')} (MoD layers "
                f"{state['layers']}), not {schedule} (MoD layers {routers.layers}); resume with the schedule it "
                "was trained with"
            )
        if bool(state.get("lora")) != bool(lora):
            raise ValueError(
                f"the checkpoint in {str(out)!r} was trained {'with' if state.get('lora') else 'without'} LoRA; "
                "resume it the same way"
            )
        routers.load_state_dict(state["routers"])
    start = int(state["step"]) if state is not None else 0
    losses: list[float] = list(state["losses"]) if state is not None else []
    seconds = float(state.get("seconds", 0.0)) if state is not None else 0.0

    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    lora_layers: list[tuple[nn.Module, str, nn.Module]] = []
    lora_info: dict[str, Any] | None = None
    handle = None
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        with tempfile.TemporaryDirectory() as tmp:
            MoDRouters.for_model(model, config).save(tmp)
            applied = dataclasses.replace(config, signal="router", routers=tmp)
            handle = apply(model, applied)
        if not hasattr(handle.state, "routers"):
            raise TypeError(f"{type(config).__name__}'s applied state has no 'routers' to train")
        handle.state.routers = routers  # the hooks read it live: gradients reach these parameters
        params = list(routers.parameters())
        if lora:
            lora_cfg = default_lora_config(model) if lora is True else lora
            lora_layers = _inject_lora(model, lora_cfg)
            for p in model.parameters():  # peft leaves only its own parameters trainable; be sure of it
                p.requires_grad_(False)
            for p in _lora_params(lora_layers):
                p.requires_grad_(True)
            params += _lora_params(lora_layers)
            targets = lora_cfg.target_modules
            lora_info = {"r": lora_cfg.r, "lora_alpha": lora_cfg.lora_alpha,
                         "target_modules": sorted(targets) if not isinstance(targets, str) else targets}
            if state is not None:
                saved = state["lora_weights"]
                if set(saved) != set(_lora_named(model)):
                    raise ValueError(f"the checkpoint in {str(out)!r} has LoRA weights of other modules; resume it "
                                     "with the LoRA config it was trained with")
                model.load_state_dict({k: v.to(device) for k, v in saved.items()}, strict=False)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        if state is not None:
            opt.load_state_dict(state["optimizer"])
            for group in opt.param_groups:  # the checkpoint's moments, this call's learning rate
                group["lr"] = lr

        def checkpoint(step: int) -> None:
            out.mkdir(parents=True, exist_ok=True)
            _save_checkpoint(ckpt_path, {
                "step": step, "layers": routers.layers, "schedule": schedule, "losses": losses, "seconds": seconds,
                "routers": {k: v.detach().cpu() for k, v in routers.state_dict().items()},
                "optimizer": opt.state_dict(), "lora": lora_info is not None,
                "lora_weights": {k: v.detach().cpu() for k, v in _lora_named(model).items()} if lora_layers else {},
            })

        routers.train()
        data = _stream(batches, start) if start < steps else iter(())
        bar = tqdm(total=steps, initial=min(start, steps), desc="p-MoD routers", disable=not progress,
                   mininterval=1.0)
        t0 = time.perf_counter()
        step = start
        try:
            while step < steps:
                batch = next(data, None)
                if batch is None:
                    raise ValueError(f"batches ran out after {step} steps; give at least steps={steps} batches")
                kwargs = {"use_cache": False, **_to(batch, device, dtype)}
                if "labels" not in kwargs:
                    raise ValueError("each batch needs 'labels' (the answer tokens; -100 elsewhere) for the LM loss")
                loss = model(**kwargs).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clip:
                    torch.nn.utils.clip_grad_norm_(params, clip)
                opt.step()
                losses.append(float(loss.detach()))
                step += 1
                bar.update(1)
                if step % 10 == 0 or step == steps:
                    bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}")
                if step % checkpoint_every == 0 or step == steps:
                    seconds += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    checkpoint(step)
        finally:
            bar.close()
        if lora_layers:
            from safetensors.torch import save_file

            out.mkdir(parents=True, exist_ok=True)
            weights = {k: v.detach().float().cpu().contiguous() for k, v in _lora_named(model).items()}
            save_file(weights, str(out / LORA_WEIGHTS))
            (out / LORA_META).write_text(json.dumps(lora_info, indent=1) + "\n")
    finally:
        if lora_layers:
            _unwrap_lora(lora_layers)
        if handle is not None and not handle.removed:
            handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)

    routers.eval().requires_grad_(False)
    tail = losses[-max(1, min(50, len(losses) // 10)):] if losses else []
    head = losses[:max(1, min(50, len(losses) // 10))] if losses else []
    info = {
        "trainer": "mmskip.vision.train_routers",
        "technique": config.technique,
        "steps": len(losses),
        "lr": lr,
        "clip": clip,
        "schedule": schedule,
        "mod_layers": routers.layers,
        "tanh_scale": getattr(config, "tanh_scale", None),
        "loss_first": round(sum(head) / len(head), 4) if head else None,
        "loss_last": round(sum(tail) / len(tail), 4) if tail else None,
        "loss_curve": _curve(losses),
        "train_seconds": round(seconds, 1),
        "lora": lora_info,
        **dict(meta or {}),
    }
    routers.save(out, **info)
    routers.meta = info
    return routers


# -- evaluation on digits-llava ------------------------------------------------------------------


@torch.no_grad()
def evaluate_configs(
    model: nn.Module,
    tokenizer: Any,
    data: Any,
    configs: Sequence[tuple[str, SkipConfig | None, nn.Module | None]],
    batch: int = 50,
) -> list[dict[str, Any]]:
    """Held-out accuracy of ``digits-llava``-style one-token answers under each config.

    ``data`` is a :class:`mmskip.zoo.llava_data.Batch`; each config is ``(name, config or None for the
    unmodified model, model to use instead of ``model`` or None)``. Prompts are left-padded and the
    answer is the argmax of the prefill's last logits (the first generated token). Per row: accuracy
    per question type and ``all``, agreement with the first config, and the token-weighted mean of
    ``handle.stats()``'s ``prefill_flops_fraction`` and ``kv_fraction`` over the prefills."""
    from mmskip.zoo import llava_data as D

    vocab = tokenizer.get_vocab()
    target = [vocab[a] for a in data.answers]
    rows, first = [], None
    for name, cfg, other in configs:
        m = other if other is not None else model
        dev = next(m.parameters()).device
        handle = apply(m, cfg) if cfg is not None else None
        preds, flops, kv, tokens = [], 0.0, 0.0, 0
        try:
            for s in range(0, len(data.questions), batch):
                enc = tokenizer([D.prompt_text(q) for q in data.questions[s:s + batch]], padding=True,
                                return_tensors="pt")
                inp = {"input_ids": enc["input_ids"].to(dev), "attention_mask": enc["attention_mask"].to(dev),
                       "pixel_values": data.pixel_values[s:s + batch].to(dev, next(m.parameters()).dtype)}
                logits = m(**inp, logits_to_keep=1, use_cache=False).logits[:, -1]
                preds += logits.argmax(-1).tolist()
                n = inp["input_ids"].numel()
                tokens += n
                st = handle.stats() if handle is not None else {}
                flops += st.get("prefill_flops_fraction", 1.0) * n
                kv += st.get("kv_fraction", 1.0) * n
        finally:
            if handle is not None:
                handle.remove()
        right = [p == t for p, t in zip(preds, target, strict=True)]
        row: dict[str, Any] = {"config": name, "signal": getattr(cfg, "signal", "-") if cfg is not None else "-"}
        for t in D.QTYPES:
            sel = [r for r, q in zip(right, data.qtypes, strict=True) if q == t]
            if sel:
                row[f"acc_{t}"] = sum(sel) / len(sel)
        row["acc_all"] = sum(right) / len(right)
        row["acc_all_se"] = math.sqrt(row["acc_all"] * (1 - row["acc_all"]) / len(right))
        row["prefill_flops_fraction"] = flops / tokens
        row["kv_fraction"] = kv / tokens
        first = preds if first is None else first
        row["agree_first"] = sum(a == b for a, b in zip(preds, first, strict=True)) / len(preds)
        rows.append(row)
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| config | signal | prefill FLOPs | KV | acc digit / count / sum / all | agree w/ unmodified |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['signal']} | {r['prefill_flops_fraction']:.3f} | {r['kv_fraction']:.3f} | "
                     f"{r.get('acc_digit', 0):.3f} / {r.get('acc_count', 0):.3f} / {r.get('acc_sum', 0):.3f} / "
                     f"{r['acc_all']:.3f} | {r['agree_first']:.3f} |")
    return "\n".join(lines)


# -- command line --------------------------------------------------------------------------------


def steep(num_layers: int) -> tuple[float, ...]:
    """A harsher schedule than PRD (``benchmarks/vision_tokens.py``'s "steep"): layer 0 full, then 0.35
    decaying by 0.75 per layer, floored at 0.1."""
    return (1.0,) + tuple(max(0.1, 0.35 * 0.75 ** (i - 1)) for i in range(1, num_layers))


def parse_schedule(text: str, num_layers: int) -> Any:
    """``progressive`` (p-MoD's PRD), ``steep`` or comma-separated keep ratios, one per decoder layer."""
    from mmskip import schedules

    if text == "progressive":
        return schedules.progressive()
    if text == "steep":
        return schedules.explicit(ratios=steep(num_layers))
    try:
        ratios = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"unknown schedule {text!r}; use progressive, steep or {num_layers} comma-separated "
                         "keep ratios (e.g. 1,1,0.8,0.6,...)") from None
    if len(ratios) != num_layers:
        raise ValueError(f"--schedule gives {len(ratios)} ratios, the model has {num_layers} decoder layers")
    return schedules.explicit(ratios=ratios)


def load_model(name: str) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a zoo name (``digits-llava``) or a ``from_pretrained`` folder of a
    model made by the digits-llava recipe; ``ValueError`` / ``FileNotFoundError`` saying what is wrong."""
    from mmskip import zoo
    from mmskip.zoo import llava_data as D
    from mmskip.zoo.loaders import load_llava

    if Path(name).is_dir():
        try:
            model, tok = load_llava(Path(name))
        except (OSError, ValueError) as e:
            raise ValueError(f"{name} is not a from_pretrained folder of a LLaVA model and its tokenizer ({e})") from None
    else:
        zoo.path(name)  # UnknownModelError (ValueError) / FileNotFoundError with what to do
        if name != "digits-llava":
            raise ValueError(f"zoo model {name!r} is not a vision-language model; routers train on digits-llava "
                             "(or a folder with a model trained by its recipe)")
        model, tok = zoo.load(name)
    if tok.convert_tokens_to_ids(D.IMAGE_TOKEN) != getattr(model.config, "image_token_id", None):
        raise ValueError(f"{name}: its tokenizer's {D.IMAGE_TOKEN} is not the model's image token; this trainer "
                         "uses digits-llava's data and needs a model made by its recipe")
    return model.eval(), tok


def digit_batches(tokenizer: Any, batch: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless training batches of the digits-llava recipe's data (train digits + augmented copies,
    1-10 class palettes, question mix 50/25/25 %), teacher-forced with labels on the answer and ``</s>``."""
    from mmskip.zoo import llava_data as D
    from mmskip.zoo.train_llava import COPIES, PALETTE

    bank = D.digit_bank("train", copies=COPIES, seed=seed)
    g = torch.Generator().manual_seed(seed)
    while True:
        images, labels = D.make_grids(bank, batch, g, palette=PALETTE)
        b = D.make_batch(tokenizer, images, *D.sample_questions(labels, g))
        yield {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "pixel_values": b.pixel_values,
               "labels": b.labels}


def heldout(tokenizer: Any, n_per_type: int) -> Any:
    """The first ``n_per_type`` questions of each type of the recipe's held-out set (seed 1234, held-out
    digits; the same questions ``benchmarks/vision_tokens.py`` uses)."""
    from mmskip.zoo import llava_data as D

    full = D.heldout_set(tokenizer, max(n_per_type, 500))
    pick = [i for t in D.QTYPES for i in [j for j, q in enumerate(full.qtypes) if q == t][:n_per_type]]
    return D.Batch(full.pixel_values[pick], full.input_ids[pick], full.attention_mask[pick], full.labels[pick],
                   full.answer_pos[pick], [full.qtypes[i] for i in pick], [full.questions[i] for i in pick],
                   [full.answers[i] for i in pick])


def _error(message: str) -> int:
    """One line on stderr (what is wrong and what to do) and exit status 2, like argparse's errors."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="digits-llava", help="zoo name (digits-llava) or from_pretrained folder")
    ap.add_argument("--out", required=True, help="folder for the routers, checkpoint.pt, any LoRA and eval.json")
    ap.add_argument("--steps", type=int, default=300, help="training steps in all (a resumed run counts the earlier ones)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--schedule", default="progressive",
                    help="progressive (p-MoD's PRD, default), steep, or comma-separated keep ratios per layer")
    ap.add_argument("--tanh-scale", type=float, default=0.2, help="TanhNorm alpha in w = alpha * tanh(r) + 1")
    ap.add_argument("--lora", action="store_true", help="also train LoRA adapters (peft, rank 8, language model q/v)")
    ap.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    ap.add_argument("--overwrite", action="store_true", help="start over even if --out has a checkpoint")
    ap.add_argument("--checkpoint-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1, help="training data stream seed (the base model used 0)")
    ap.add_argument("--eval-n", type=int, default=200, help="held-out questions per type (0: no evaluation)")
    ap.add_argument("--eval-batch", type=int, default=50)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.checkpoint_every < 1:
        return _error("--steps, --batch and --checkpoint-every must be >= 1")
    if args.eval_n < 0 or args.eval_batch < 1:
        return _error("--eval-n must be >= 0 and --eval-batch >= 1")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return _error(f"--out {args.out}: exists and is not a folder")
    if args.resume and not (out / CHECKPOINT).is_file():
        return _error(f"--resume: no checkpoint in {args.out} (expected {CHECKPOINT}); run without --resume to "
                      "train from scratch")
    if not args.resume and not args.overwrite and (out / CHECKPOINT).is_file():
        return _error(f"--out {args.out} holds a checkpoint of an earlier run; pass --resume to continue it or "
                      "--overwrite to start over")
    if args.threads:
        torch.set_num_threads(args.threads)

    from mmskip.vision import MoDConfig

    try:
        model, tok = load_model(args.model)
    except (FileNotFoundError, ValueError) as e:  # unknown name, untrained zoo model, not digits-llava
        return _error(f"--model {args.model}: {e}")
    num_layers = get_adapter(model, "vlm").num_layers
    try:
        config = MoDConfig(schedule=parse_schedule(args.schedule, num_layers), tanh_scale=args.tanh_scale)
        ratios = config.schedule.ratios(num_layers)
        MoDRouters.for_model(model, config)  # validates the schedule against the model
    except ValueError as e:
        return _error(f"--schedule {args.schedule}: {e}")

    try:
        routers = train_mod_routers(
            model, config, digit_batches(tok, args.batch, args.seed), steps=args.steps, lr=args.lr, out=out,
            resume=args.resume, lora=args.lora, checkpoint_every=args.checkpoint_every,
            progress=not args.no_progress,
            meta={"model": args.model, "batch": args.batch, "seed": args.seed, "schedule_arg": args.schedule,
                  "ratios": list(ratios)},
        )
    except (FileNotFoundError, ValueError) as e:  # a checkpoint that does not fit, for instance
        return _error(str(e))
    info = routers.meta
    print(f"trained routers for MoD layers {routers.layers} ({info['steps']} steps, {info['train_seconds']:.0f} s): "
          f"loss {info['loss_first']} -> {info['loss_last']}; saved to {out}")
    if args.eval_n == 0:
        return 0

    data = heldout(tok, args.eval_n)
    schedule = config.schedule
    rows_cfg: list[tuple[str, SkipConfig | None, nn.Module | None]] = [("unmodified", None, None)]
    lora_model = merged_with_lora(model, out) if args.lora else None
    if lora_model is not None:
        rows_cfg.append(("LoRA merged, no MoD", None, lora_model))
    rows_cfg.append((f"p-MoD {args.schedule}{' + LoRA' if args.lora else ''}",
                     MoDConfig(schedule=schedule, signal="router", routers=str(out), tanh_scale=args.tanh_scale),
                     lora_model))
    rows_cfg += [(f"p-MoD {args.schedule}", MoDConfig(schedule=schedule, signal=s), None) for s in ("attention", "norm")]
    t0 = time.perf_counter()
    rows = evaluate_configs(model, tok, data, rows_cfg, batch=args.eval_batch)
    table = _table(rows)
    result = {
        "model": args.model,
        "n_per_type": args.eval_n,
        "schedule": args.schedule,
        "ratios": list(ratios),
        "mod_layers": routers.layers,
        "train": {k: info[k] for k in ("steps", "lr", "loss_first", "loss_last", "loss_curve", "train_seconds",
                                       "lora")} | {"batch": args.batch, "seed": args.seed},
        "eval_seconds": round(time.perf_counter() - t0, 1),
        "threads": torch.get_num_threads(),
        "device": str(next(model.parameters()).device),
        "torch": torch.__version__,
        "rows": rows,
    }
    (out / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{args.model}: {args.eval_n} held-out questions per type; prefill FLOPs / KV = token-weighted mean of "
          f"handle.stats() (decoder layers' matmuls + signal cost); 1 s.e. of acc all <= "
          f"{max(r['acc_all_se'] for r in rows):.3f}\n")
    print(table)
    print(f"\nwrote {out / 'eval.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
