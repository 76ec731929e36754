"""SkipPipe: partial and reordered pipeline-parallel training (https://arxiv.org/abs/2502.19913).

    from mmskip.train.skippipe import SkipPipeConfig, TrainSpec, launch, plan
    print(plan(SkipPipeConfig(stages=5, skip_ratio=0.5)).table())          # the path schedule, no processes
    record = launch(SkipPipeConfig(stages=5, skip_ratio=0.5), TrainSpec(iterations=50, out="runs/sp"))

or ``torchrun --standalone --nproc-per-node 5 -m mmskip.train.skippipe --stages 5 --skip-ratio 0.5 --out runs/sp``.
"""

from .config import Node, SkipPipeConfig
from .launch import SkipPipeJobError, launch
from .runtime import TrainSpec, run_worker
from .schedule import Op, Path, Schedule, ScheduleError, StageCosts, plan
from .stages import layer_ranges, run_path, split

__all__ = ["SkipPipeConfig", "TrainSpec", "Node", "StageCosts", "Path", "Op", "Schedule", "ScheduleError", "plan",
           "launch", "run_worker", "SkipPipeJobError", "split", "run_path", "layer_ranges"]
