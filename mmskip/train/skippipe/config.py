"""``SkipPipeConfig``: the pipeline, its nodes and the partial-path rules SkipPipe schedules by."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

__all__ = ["SkipPipeConfig", "Node"]


@dataclass(frozen=True, order=True)
class Node:
    """One process of the job: ``replica`` ``r`` of stage ``s`` (rank ``r * stages + s``)."""

    stage: int
    replica: int

    def rank(self, stages: int) -> int:
        return self.replica * stages + self.stage

    def __str__(self) -> str:
        return f"s{self.stage}r{self.replica}"


@dataclass(frozen=True)
class SkipPipeConfig:
    """Partial, reordered pipeline-parallel training (SkipPipe, https://arxiv.org/abs/2502.19913).

    The model is cut into ``stages``: stage 0 holds the embedding *and* the LM head (their weights are
    tied), stages 1 … S−1 hold consecutive decoder layers. A microbatch's *path* starts at a stage-0
    node, visits the middle stages it does not skip (possibly with two of them swapped), and comes
    back to the same stage-0 node for the head and the loss. ``replicas`` pipelines run side by side
    (data parallel); a path may use any replica of a middle stage, and each stage's gradients are
    summed over its replicas.

    Args:
        stages: pipeline stages including stage 0 (≥ 2).
        replicas: data-parallel pipelines (≥ 1); the job has ``stages * replicas`` processes.
        microbatches: microbatches per stage-0 node per iteration.
        skip_ratio: the share of microbatches that skip each middle stage (0 = full pipeline).
        max_skips: the most middle stages one path may skip (default: as few as the ratio needs,
            ``ceil(skip_ratio * (stages - 1))``). A path always keeps at least one middle stage.
        keep_first: middle stages at the start that no path skips or swaps (default 0: as in
            SkipPipe, any stage but stage 0 may be skipped).
        swap_prob: probability that a path swaps two adjacent middle stages it visits (default 0).
        memory: the most microbatches whose activations one node may hold at once (per node as a
            list indexed by rank, or one number for all; default: no limit).
        speed: relative compute time per node, indexed by rank (1 = the fastest; 2 = twice as
            slow); the scheduler plans with it and the runtime simulates it with delays.
        costs: seconds per microbatch at speed 1 for the scheduler, ``(embed, head, embed_bwd, fwd, bwd,
            comm)`` as in :class:`~mmskip.train.skippipe.schedule.StageCosts` (default: its relative costs).
        cross_replica: whether a path may use another pipeline's replica of a middle stage (SkipPipe's
            routing; ``False`` with ``skip_ratio=0`` is the plain data- and pipeline-parallel baseline).
        trials: random restarts of the path scheduler; the schedule with the shortest makespan wins.
        schedule_seed: seed of the scheduler's restarts (every rank plans the same schedule).
    """

    stages: int = 4
    replicas: int = 1
    microbatches: int = 8
    skip_ratio: float = 0.0
    max_skips: int | None = None
    keep_first: int = 0
    swap_prob: float = 0.0
    memory: int | tuple[int, ...] | None = None
    speed: tuple[float, ...] | None = None
    costs: tuple[float, ...] | None = None
    cross_replica: bool = True
    trials: int = 16
    schedule_seed: int = 0

    def __post_init__(self) -> None:
        if self.stages < 2 or self.replicas < 1 or self.microbatches < 1:
            raise ValueError(f"need stages >= 2, replicas >= 1, microbatches >= 1; got {self.stages}, "
                             f"{self.replicas}, {self.microbatches}")
        if not 0.0 <= self.skip_ratio < 1.0:
            raise ValueError(f"skip_ratio is the share of microbatches that skip each middle stage, in [0, 1); "
                             f"got {self.skip_ratio}")
        middle = self.stages - 1
        if not 0 <= self.keep_first <= middle:
            raise ValueError(f"keep_first must lie in [0, {middle}] (the middle stages), got {self.keep_first}")
        skippable = middle - self.keep_first
        if self.skip_ratio > 0 and skippable == 0:
            raise ValueError(f"skip_ratio {self.skip_ratio} but no middle stage may be skipped "
                             f"(stages={self.stages}, keep_first={self.keep_first}); lower keep_first or add stages")
        k = self.skips_per_path
        if k > min(skippable, middle - 1):
            raise ValueError(f"max_skips {k} is more than the {min(skippable, middle - 1)} middle stages a path may "
                             "skip (it keeps the first keep_first stages and at least one middle stage)")
        n = self.microbatches * self.replicas
        if self.skips_per_stage * skippable > k * n:
            raise ValueError(f"skip_ratio {self.skip_ratio} over {skippable} skippable stages needs paths that skip "
                             f"{self.skips_per_stage * skippable / n:.2f} stages on average, more than max_skips={k}")
        if not 0.0 <= self.swap_prob <= 1.0:
            raise ValueError(f"swap_prob must lie in [0, 1], got {self.swap_prob}")
        n = self.world_size
        if self.speed is not None and (len(self.speed) != n or min(self.speed) <= 0):
            raise ValueError(f"speed needs one positive factor per process ({n}), got {self.speed}")
        if isinstance(self.memory, tuple) and len(self.memory) != n:
            raise ValueError(f"memory needs one limit per process ({n}), got {len(self.memory)}")
        if self.costs is not None and (len(self.costs) != 6 or min(self.costs) < 0):
            raise ValueError(f"costs needs six non-negative seconds (embed, head, embed_bwd, fwd, bwd, comm), got {self.costs}")
        if self.trials < 1:
            raise ValueError(f"trials must be >= 1, got {self.trials}")

    @property
    def world_size(self) -> int:
        return self.stages * self.replicas

    @property
    def skips_per_stage(self) -> int:
        """How many of an iteration's microbatches skip each skippable middle stage."""
        return round(self.skip_ratio * self.microbatches * self.replicas)

    @property
    def skips_per_path(self) -> int:
        """The most stages one path skips (``max_skips``, or the fewest that fit the skips)."""
        if self.max_skips is not None:
            return self.max_skips
        n = self.microbatches * self.replicas
        return math.ceil(self.skips_per_stage * (self.stages - 1 - self.keep_first) / n - 1e-9)

    def nodes(self) -> list[Node]:
        return [Node(s, r) for r in range(self.replicas) for s in range(self.stages)]

    def node_speed(self, node: Node) -> float:
        return 1.0 if self.speed is None else self.speed[node.rank(self.stages)]

    def node_memory(self, node: Node) -> int | None:
        if self.memory is None or isinstance(self.memory, int):
            return self.memory
        return self.memory[node.rank(self.stages)]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SkipPipeConfig:
        d = json.loads(text)
        for key in ("speed", "memory", "costs"):
            if isinstance(d.get(key), list):
                d[key] = tuple(d[key])
        return cls(**d)
