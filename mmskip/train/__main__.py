"""``mmskip train``: fine-tune or pretrain a causal LM for skipping, from the shell.

    mmskip train --model stdlib-lm --out runs/ft --objective schedule-aware lm --speedup 1.5 --lora
    mmskip train --model stdlib-lm --out runs/ls --objective layer-dropout early-exit --steps 400
    mmskip train --model stdlib-lm --out runs/ls --objective layer-dropout early-exit --steps 400 --resume

``python -m mmskip.train`` is an alias.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from mmskip.cli import (
    ArgumentParser,
    UsageError,
    at_least,
    existing_file,
    fraction,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    run,
    writable_dir,
)

OBJECTIVES = {
    "lm": "next-token cross-entropy of the final logits",
    "distill": "KL from the unmodified model's next-token distribution (FiRST's quality term)",
    "schedule-aware": "train with a layer-skip schedule active (Unified Layer Skipping, arXiv 2404.06954); "
                      "--speedup S or --skip I ...",
    "layer-dropout": "each sample drops layer l with a rate rising with depth (LayerSkip, arXiv 2404.16710); --p-max",
    "early-exit": "every layer's output through the shared norm + head predicts the next token, "
                  "rotational/gradual curriculum (LayerSkip); --e-scale --curriculum --rotation. Replaces lm",
}
ROUTERS_NOTE = "FiRST routers (router gates + sparsity): python -m mmskip.train.first --help"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    epilog = "objectives:\n" + "\n".join(f"  {k:<15} {v}" for k, v in OBJECTIVES.items()) + f"\n\n{ROUTERS_NOTE}"
    p = ArgumentParser(prog="mmskip train", description=__doc__.split("\n\n")[0],
                                epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="stdlib-lm", help="zoo name or transformers from_pretrained folder")
    p.add_argument("--out", required=True, type=writable_dir,
                   help="folder for the trained model, train_info.json, checkpoint/ (checked before any work)")
    p.add_argument("--text", type=existing_file,
                   help="training text file (default: the stdlib train split; held-out split for eval)")
    p.add_argument("--objective", nargs="+", default=["lm"], choices=sorted(OBJECTIVES), metavar="NAME",
                   help=f"one or more of: {', '.join(OBJECTIVES)} (default: lm)")
    g = p.add_argument_group("schedule-aware")
    g.add_argument("--speedup", type=positive_float, default=None, help="skip schedules.unified(speedup)")
    g.add_argument("--skip", type=non_negative_int, nargs="+", default=None,
                   help="skip these layers (schedules.explicit)")
    g = p.add_argument_group("layer-dropout / early-exit")
    g.add_argument("--p-max", type=fraction, default=0.2, help="highest layer-dropout rate (0 to 1)")
    g.add_argument("--dropout-curriculum", choices=["constant", "exponential"], default="constant")
    g.add_argument("--e-scale", type=non_negative_float, default=1.0)
    g.add_argument("--curriculum", choices=["rotational", "gradual", "none"], default="rotational")
    g.add_argument("--rotation", type=positive_int, default=4)
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=positive_int, default=300)
    g.add_argument("--batch", type=positive_int, default=8)
    g.add_argument("--seq-len", type=at_least(2), default=256)
    g.add_argument("--lr", type=positive_float, default=None, help="default 1e-3 with --lora, else 3e-4")
    g.add_argument("--warmup", type=non_negative_int, default=20)
    g.add_argument("--weight-decay", type=non_negative_float, default=0.0)
    g.add_argument("--grad-accum", type=positive_int, default=1)
    g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    g.add_argument("--lora", action="store_true", help="train peft LoRA adapters only; saved in OUT/lora, merged into OUT")
    g.add_argument("--lora-rank", type=positive_int, default=8)
    g.add_argument("--seed", type=non_negative_int, default=0)
    g.add_argument("--eval-every", type=non_negative_int, default=0, help="held-out evaluation every N steps (0: at the end)")
    g.add_argument("--save-every", type=non_negative_int, default=0, help="checkpoint every N steps (0: at the end)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    g.add_argument("--stop-at", type=positive_int, default=None, help="stop after this step (checkpointed; --resume later)")
    g.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: torch's default)")
    g.add_argument("--cpu", action="store_true", help="train on the CPU even with a GPU present")
    args = p.parse_args(argv)
    if "schedule-aware" in args.objective and (args.speedup is None) == (args.skip is None):
        p.error("schedule-aware needs exactly one of --speedup S or --skip I [I ...]")
    return args


def build_objectives(args: argparse.Namespace) -> list[Any]:
    """The objectives the command line names, in the order given."""
    import mmskip
    from mmskip import schedules

    from . import Distillation, EarlyExitLoss, LanguageModeling, LayerDropout, ScheduleAware

    out = []
    for name in args.objective:
        if name == "lm":
            out.append(LanguageModeling())
        elif name == "distill":
            out.append(Distillation())
        elif name == "schedule-aware":
            try:
                sched = (schedules.unified(args.speedup) if args.speedup is not None
                         else schedules.explicit(skip=args.skip))
            except ValueError as e:
                raise UsageError(f"schedule-aware: {e}") from None
            out.append(ScheduleAware(mmskip.LayerSkipConfig(schedule=sched, phase="all")))
        elif name == "layer-dropout":
            out.append(LayerDropout(args.p_max, curriculum=args.dropout_curriculum, seed=args.seed))
        elif name == "early-exit":
            out.append(EarlyExitLoss(args.e_scale, curriculum=args.curriculum, rotation=args.rotation))
    return out


def _streams(tokenizer: Any, text: str | None) -> tuple[Any, Any]:
    from .data import token_stream

    if text is not None:
        ids = token_stream(tokenizer, [Path(text).read_text(errors="replace")])
        cut = int(len(ids) * 0.9)
        return ids[:cut], ids[cut:]
    from mmskip.zoo.stdlib_data import read_texts

    return token_stream(tokenizer, read_texts("train")), token_stream(tokenizer, read_texts("test"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from mmskip.eval.lm import load_lm

    from .config import TrainConfig
    from .trainer import train

    try:
        model, tokenizer = load_lm(args.model)
    except (FileNotFoundError, ValueError) as e:  # unknown name, untrained zoo model, not a language model
        raise UsageError(f"--model {args.model}: {e}") from None
    objectives = build_objectives(args)
    lr = args.lr if args.lr is not None else (1e-3 if args.lora else 3e-4)
    config = TrainConfig(steps=args.steps, batch_size=args.batch, seq_len=args.seq_len, lr=lr, warmup=args.warmup,
                         weight_decay=args.weight_decay, grad_accum=args.grad_accum,
                         mixed_precision=args.mixed_precision, trainable="lora" if args.lora else "all",
                         lora_rank=args.lora_rank, merge_lora=False, seed=args.seed, eval_every=args.eval_every,
                         save_every=args.save_every, cpu=args.cpu)
    train_ids, eval_ids = _streams(tokenizer, args.text)
    t0 = time.time()
    result = train(model, objectives, train_ids, config, eval_data=eval_ids, out=args.out, resume=args.resume,
                   stop_at=args.stop_at)
    trained = result.model
    if args.lora:
        trained.save_pretrained(args.out / "lora")
        trained = trained.merge_and_unload()
    trained.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    info = {"model": args.model, "objectives": [repr(o) for o in objectives], "config": config.to_dict(),
            "steps_done": result.steps, "seconds": time.time() - t0, "history": result.history}
    (args.out / "train_info.json").write_text(json.dumps(info, indent=1) + "\n")
    last = result.evaluations[-1] if result.evaluations else {}
    print(f"trained {result.steps}/{config.steps} steps in {info['seconds']:.0f}s; held-out {last}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run("train", main))
