"""``torchrun --standalone --nproc-per-node N -m mmskip.train.skippipe [options]``: train with SkipPipe.

``python -m mmskip.train.skippipe --plan-only [options]`` prints the path schedule (and ``--plot FILE``
draws it) without starting any process.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import MISSING, fields

from torch.distributed.elastic.multiprocessing.errors import record

from .config import SkipPipeConfig
from .runtime import TrainSpec, run_worker
from .schedule import plan


def parse_args(argv: list[str] | None = None) -> tuple[SkipPipeConfig, TrainSpec, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m mmskip.train.skippipe", description=__doc__.splitlines()[0])
    for cls in (SkipPipeConfig, TrainSpec):
        group = p.add_argument_group(cls.__name__)
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            default = None if f.default is MISSING else f.default
            kind = str(f.type)
            if kind == "bool":
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
            elif "tuple" in kind:
                group.add_argument(flag, nargs="+", type=float if f.name in ("speed", "costs") else int, default=default)
            elif "float" in kind:
                group.add_argument(flag, type=float, default=default)
            elif "int" in kind:
                group.add_argument(flag, type=int, default=default)
            else:
                group.add_argument(flag, default=default)
    p.add_argument("--plan-only", action="store_true", help="print the schedule and exit (no processes)")
    p.add_argument("--plot", help="with --plan-only: write the schedule's Gantt chart here")
    args = p.parse_args(argv)

    def build(cls):
        kw = {}
        for f in fields(cls):
            v = getattr(args, f.name)
            if isinstance(v, list):
                v = tuple(v) if f.name != "memory" or len(v) > 1 else v[0]
            kw[f.name] = v
        return cls(**kw)

    return build(SkipPipeConfig), build(TrainSpec), args


@record  # torchrun reports a failing rank's exception as the job's root cause
def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg, spec, args = parse_args(argv)
    if args.plan_only:
        schedule = plan(cfg)
        print(schedule.table())
        if args.plot:
            schedule.plot(args.plot)
        return
    record = run_worker(cfg, spec)
    if record is not None:
        print(f"done: {record['iterations']} iterations in {record['train_seconds']:.1f} s, final loss "
              f"{record['history'][-1]['loss']:.4f}"
              + (f", val ppl {record['val_ppl_full']:.2f} (half: {record['val_ppl_half']:.2f})"
                 if "val_ppl_full" in record else ""))


if __name__ == "__main__":
    main()
