"""Train p-MoD routers on a frozen vision-language model (optionally with LoRA adapters), then compare
held-out accuracy and prefill FLOPs with the unmodified model and the training-free signals.

    python -m mmskip.vision.pmod.train --model digits-llava --out runs/pmod-routers --steps 300
    python -m mmskip.vision.pmod.train --model digits-llava --out runs/r --lora          # routers + LoRA (peft)
    python -m mmskip.vision.pmod.train --model digits-llava --out runs/r --steps 600 --resume

Training: fresh zero routers (``MoDRouters.for_model``) are attached with
``MoDConfig(signal="router")``, i.e. p-MoD's TanhNorm weights ``w = alpha * tanh(r) + 1`` and STRing
(kept vision tokens' MLP output x ``w``, skipped vision tokens ``w * h``); the applied hooks read
``handle.state.routers``, which is the module being optimised, so the language-model loss on the
answer tokens reaches the routers through ``w`` (the top-k choice itself has no gradient, as in
p-MoD). The base model is frozen: only the routers (and LoRA adapters on the language model's
q/v projections, with ``--lora``) learn. p-MoD instead trains the whole MLLM with its MoD layers
through pre-training and instruction tuning.

Output (``--out``): ``mod_routers.safetensors`` + ``mod_routers.json`` (load with
``MoDConfig(signal="router", routers=out)``), ``checkpoint/`` (routers, optimizer, step, losses
and any LoRA weights; ``--resume`` continues it), ``lora.safetensors`` + ``lora.json`` with
``--lora``, and ``eval.json`` (the table the command prints).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
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
from mmskip.train.checkpoint import STATE_PATH, legacy_note, load_checkpoint, save_checkpoint, weights_under
from mmskip.train.data import skip_batches

from .eval import digit_batches, evaluate_configs, heldout, load_model, parse_schedule, results_table
from .lora import (
    LORA_META,
    LORA_WEIGHTS,
    _inject_lora,
    _lora_named,
    _lora_params,
    _unwrap_lora,
    default_lora_config,
    merged_with_lora,
)
from .routers import MoDRouters

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

CHECKPOINT = STATE_PATH  # under ``out``: the state file of the checkpoint folder (mmskip.train.checkpoint)
PROG = "python -m mmskip.vision.pmod.train"


# -- training ------------------------------------------------------------------------------------


def _as_saved(value: Any) -> Any:
    """``value`` as the checkpoint's JSON gives it back (tuples become lists), for comparing with it."""
    return json.loads(json.dumps(value, default=str))


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
    yield from skip_batches(batches, start)


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

    Every ``checkpoint_every`` steps and at the end, ``out/checkpoint/`` (:mod:`mmskip.train.checkpoint`)
    holds the routers, the optimizer, the step, the losses and any LoRA weights; ``resume=True``
    continues from it up to ``steps`` in all, at this call's ``lr`` (``FileNotFoundError`` without a checkpoint, ``ValueError``
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
    state: dict[str, Any] | None = None
    saved_weights: dict[str, torch.Tensor] = {}
    opt_state: dict[str, Any] | None = None
    if resume:
        got = load_checkpoint(out)
        if got is None:
            raise FileNotFoundError(
                f"resume: no checkpoint in {str(out)!r} (expected {CHECKPOINT}); start without resume to train "
                f"from scratch{legacy_note(out)}"
            )
        state, saved_weights, opt_state = got

    ref = next(model.parameters())
    device, dtype = ref.device, ref.dtype
    routers = MoDRouters.for_model(model, config).to(device=device, dtype=torch.float32)
    schedule = config.schedule.to_dict()
    if state is not None:
        saved_schedule = state.get("schedule", _as_saved(schedule))
        if state["layers"] != _as_saved(routers.layers) or saved_schedule != _as_saved(schedule):
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
        routers.load_state_dict(weights_under(saved_weights, "routers."))
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
                saved = weights_under(saved_weights, "lora.")
                if set(saved) != set(_lora_named(model)):
                    raise ValueError(f"the checkpoint in {str(out)!r} has LoRA weights of other modules; resume it "
                                     "with the LoRA config it was trained with")
                model.load_state_dict({k: v.to(device) for k, v in saved.items()}, strict=False)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        if state is not None:
            opt.load_state_dict(opt_state)
            for group in opt.param_groups:  # the checkpoint's moments, this call's learning rate
                group["lr"] = lr

        def checkpoint(step: int) -> None:
            out.mkdir(parents=True, exist_ok=True)
            weights = {f"routers.{k}": v for k, v in routers.state_dict().items()}
            if lora_layers:
                weights.update({f"lora.{k}": v for k, v in _lora_named(model).items()})
            save_checkpoint(out, step, weights, opt, None, {
                "layers": routers.layers, "schedule": schedule, "losses": losses, "seconds": seconds,
                "lora": lora_info is not None,
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
        "trainer": "mmskip.vision.pmod.train",
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


# -- command line --------------------------------------------------------------------------------


def _error(message: str) -> int:
    """One line on stderr (what is wrong and what to do) and exit status 2, like argparse's errors."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="digits-llava", help="zoo name (digits-llava) or from_pretrained folder")
    ap.add_argument("--out", required=True, help="folder for the routers, the checkpoint, any LoRA and eval.json")
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
    table = results_table(rows)
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
