"""Train p-MoD routers on a frozen vision-language model (optionally with LoRA adapters), then compare
held-out accuracy and prefill FLOPs with the unmodified model and the training-free signals.

    python -m mmskip.vision.pmod.train --model digits-llava --out runs/pmod-routers --steps 300
    python -m mmskip.vision.pmod.train --model digits-video --out runs/v --schedule 1,0.125,0.125,0.125,0.125,0.125
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
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmskip.inject import SkipConfig, apply
from mmskip.registry import get_adapter
from mmskip.train.batches import StepBatches, loss_curve_windows, to_device
from mmskip.train.checkpoint import STATE_PATH, legacy_note
from mmskip.train.config import TrainConfig
from mmskip.train.loop import TrainTask, fit

from .eval import (
    digit_batches,
    evaluate_configs,
    heldout,
    load_model,
    parse_schedule,
    results_table,
    takes_video,
    video_batches,
)
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


class _RouterTask(TrainTask):
    """p-MoD routers (and optional LoRA adapters) on a frozen model, trained for its LM loss (:func:`fit`)."""

    desc = "p-MoD routers"

    def __init__(self, model: nn.Module, config: SkipConfig, routers: MoDRouters, data: StepBatches,
                 lora: Any) -> None:
        self.model, self.config, self.routers, self.data, self.lora = model, config, routers, data, lora
        ref = next(model.parameters())
        self.device, self.dtype = ref.device, ref.dtype
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.was_training = model.training
        self.lora_layers: list[tuple[nn.Module, str, nn.Module]] = []
        self.lora_info: dict[str, Any] | None = None
        self.lora_final: dict[str, torch.Tensor] = {}
        self.handle: Any = None
        self.losses: list[float] = []
        self._last: torch.Tensor | None = None

    def prepare(self, accelerator: Any) -> None:
        """Freeze the model, apply the router config reading ``self.routers`` live, inject any LoRA."""
        model = self.model
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        with tempfile.TemporaryDirectory() as tmp:
            MoDRouters.for_model(model, self.config).save(tmp)
            self.handle = apply(model, dataclasses.replace(self.config, signal="router", routers=tmp))
        if not hasattr(self.handle.state, "routers"):
            raise TypeError(f"{type(self.config).__name__}'s applied state has no 'routers' to train")
        self.handle.state.routers = self.routers  # the hooks read it live: gradients reach these parameters
        if self.lora:
            lora_cfg = default_lora_config(model) if self.lora is True else self.lora
            self.lora_layers = _inject_lora(model, lora_cfg)
            for p in model.parameters():  # peft leaves only its own parameters trainable; be sure of it
                p.requires_grad_(False)
            for p in _lora_params(self.lora_layers):
                p.requires_grad_(True)
            targets = lora_cfg.target_modules
            self.lora_info = {"r": lora_cfg.r, "lora_alpha": lora_cfg.lora_alpha,
                              "target_modules": sorted(targets) if not isinstance(targets, str) else targets}
        self.routers.train()

    def weights(self) -> dict[str, torch.Tensor]:
        named = {f"routers.{k}": p for k, p in self.routers.named_parameters()}
        if self.lora_layers:
            named.update({f"lora.{k}": p for k, p in _lora_named(self.model).items()})
        return named

    def batch(self, step: int) -> dict[str, Any]:
        kwargs = {"use_cache": False, **to_device(self.data.at(step), self.device, self.dtype)}
        if "labels" not in kwargs:
            raise ValueError("each batch needs 'labels' (the answer tokens; -100 elsewhere) for the LM loss")
        return kwargs

    def loss(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        loss = self.model(**batch).loss
        self._last = loss.detach()
        return {"lm": loss}

    def after_step(self, step: int) -> None:
        self.losses.append(float(self._last))

    def state(self) -> dict[str, Any]:
        return {"losses": self.losses}

    def load_state(self, state: dict[str, Any]) -> None:
        self.losses = list(state["losses"])

    def finish(self) -> None:
        """Keep the LoRA weights, then put the model back as it was (also after an error)."""
        if self.lora_layers:
            self.lora_final = {k: v.detach().float().cpu().contiguous() for k, v in _lora_named(self.model).items()}
            _unwrap_lora(self.lora_layers)
        if self.handle is not None and not self.handle.removed:
            self.handle.remove()
        for p, flag in self.flags:
            p.requires_grad_(flag)
        self.model.train(self.was_training)


def _check_resumable(out: Path, routers: MoDRouters, schedule: dict[str, Any], lora: Any) -> None:
    """``FileNotFoundError`` without a checkpoint in ``out``; ``ValueError`` when it was trained with
    another schedule or LoRA setting (or by the trainer before :func:`fit`)."""
    if not (out / CHECKPOINT).is_file():
        raise FileNotFoundError(f"resume: no checkpoint in {str(out)!r} (expected {CHECKPOINT}); start without "
                                f"resume to train from scratch{legacy_note(out)}")
    state = json.loads((out / CHECKPOINT).read_text())
    if "task" not in state or "config" not in state:
        raise ValueError(f"the checkpoint in {str(out)!r} was written by an earlier mmskip (before the one training "
                         "loop) that this one cannot continue: finish it with that version, or start anew")
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

    Training is one :class:`~mmskip.train.TrainTask` of :func:`mmskip.train.fit`: only the routers
    train (AdamW, constant ``lr``, no weight decay, gradient norm clipped to ``clip``; ``None``/0: no
    clipping), plus LoRA adapters when ``lora`` is ``True`` (rank 8 on the language model's q/v
    projections, see :func:`default_lora_config`) or a peft ``LoraConfig``. LoRA layers are injected in
    place (``peft.inject_adapter_in_model``) *after* ``mmskip.apply`` (so the handle's FLOP costs are the
    base model's) and taken out again at the end; their weights go to ``out/lora.safetensors``
    (:func:`merged_with_lora` gives a model with them merged).

    Every ``checkpoint_every`` steps and at the end, ``out/checkpoint/`` (:mod:`mmskip.train.checkpoint`)
    holds the routers, the optimizer, the step, the losses and any LoRA weights; ``resume=True``
    continues from it up to ``steps`` in all, at this call's ``lr`` (``FileNotFoundError`` without a
    checkpoint, ``ValueError`` when its schedule or LoRA setting differs). The final routers are written
    with ``MoDRouters.save(out, ...)`` (metadata: steps, lr, schedule, MoD layers, loss curve, LoRA,
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
    device = next(model.parameters()).device
    routers = MoDRouters.for_model(model, config).to(device=device, dtype=torch.float32)
    schedule = config.schedule.to_dict()
    if resume:
        _check_resumable(out, routers, schedule, lora)
    task = _RouterTask(model, config, routers, StepBatches(batches, steps, cycle=True), lora)
    train_config = TrainConfig(steps=steps, lr=lr, lr_schedule="constant", weight_decay=0.0, betas=(0.9, 0.999),
                               max_grad_norm=clip or 0.0, save_every=checkpoint_every, cpu=device.type == "cpu")
    result = fit(task, train_config, out=out, resume=resume, progress=progress,
                 meta={"layers": routers.layers, "schedule": schedule, "lora": bool(lora)})
    if task.lora_final:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        save_file(task.lora_final, str(out / LORA_WEIGHTS))
        (out / LORA_META).write_text(json.dumps(task.lora_info, indent=1) + "\n")

    routers.eval().requires_grad_(False)
    losses = task.losses
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
        "loss_curve": loss_curve_windows(losses),
        "train_seconds": round(result.seconds, 1),
        "lora": task.lora_info,
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
    ap.add_argument("--model", default="digits-llava",
                    help="zoo name (digits-llava: p-MoD; digits-video: VideoLLM-MoD) or from_pretrained folder")
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

    from mmskip.vision import MoDConfig, VideoMoDConfig

    try:
        model, tok = load_model(args.model)
    except (FileNotFoundError, ValueError) as e:  # unknown name, untrained zoo model, not a recipe's VLM
        return _error(f"--model {args.model}: {e}")
    num_layers = get_adapter(model, "vlm").num_layers
    video = takes_video(model)
    cls, method = (VideoMoDConfig, "VideoLLM-MoD") if video else (MoDConfig, "p-MoD")
    try:
        config = cls(schedule=parse_schedule(args.schedule, num_layers), tanh_scale=args.tanh_scale)
        ratios = config.schedule.ratios(num_layers)
        MoDRouters.for_model(model, config)  # validates the schedule against the model
    except ValueError as e:
        return _error(f"--schedule {args.schedule}: {e}")

    try:
        routers = train_mod_routers(
            model, config, (video_batches if video else digit_batches)(tok, args.batch, args.seed), steps=args.steps,
            lr=args.lr, out=out,
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

    data = heldout(tok, args.eval_n, video)
    schedule = config.schedule
    rows_cfg: list[tuple[str, SkipConfig | None, nn.Module | None]] = [("unmodified", None, None)]
    lora_model = merged_with_lora(model, out) if args.lora else None
    if lora_model is not None:
        rows_cfg.append(("LoRA merged, no MoD", None, lora_model))
    rows_cfg.append((f"{method} {args.schedule}{' + LoRA' if args.lora else ''}",
                     cls(schedule=schedule, signal="router", routers=str(out), tanh_scale=args.tanh_scale),
                     lora_model))
    rows_cfg += [(f"{method} {args.schedule}", cls(schedule=schedule, signal=s), None) for s in ("attention", "norm")]
    t0 = time.perf_counter()
    rows = evaluate_configs(model, tok, data, rows_cfg, batch=args.eval_batch)
    table = results_table(rows, tuple(dict.fromkeys(data.qtypes)))  # the question types, in the data's order
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
