"""SkipPipe's path scheduler: which stages each microbatch skips, in what order, on which nodes, and when.

SkipPipe (https://arxiv.org/abs/2502.19913) gives every microbatch its own path through the
pipeline. This scheduler builds them in three steps, and keeps the best of ``trials`` restarts:

1. **Skips**: each skippable middle stage is skipped by ``round(skip_ratio · N)`` of the ``N``
   microbatches, given to the paths that have skipped least so far (ties at random), never more
   than ``max_skips`` per path, never the first ``keep_first`` middle stages, never every middle
   stage of a path. The skip ratio therefore holds exactly per stage.
2. **Swaps**: with probability ``swap_prob`` a path exchanges two adjacent middle stages it visits
   (not among the first ``keep_first``).
3. **Nodes and times**: a discrete-event simulation of the job with the per-node costs. When a
   microbatch is ready for a middle stage it goes to the replica of that stage that can start it
   earliest (collision-aware routing), among those with room in ``memory``; a node runs its ready
   work backward-first (frees activations, as 1F1B does), then by arrival. A *collision* is an
   operation that waits for a busy node; *idle* time is a node's makespan minus its busy time.

The result is a :class:`Schedule`: every node's operations in order (what the runtime executes),
the makespan, collisions, idle time, a text table and a plot. :meth:`Schedule.check` verifies every
constraint; the tests run it on generated cases without starting any process.
"""

from __future__ import annotations

import heapq
import random
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path as FilePath

from .config import Node, SkipPipeConfig

__all__ = ["StageCosts", "Path", "Op", "Schedule", "plan", "ScheduleError"]

# operation kinds; EMBED/HEAD/EMBED_BWD run on the stage-0 node of a path
EMBED, FWD, HEAD, BWD, EMBED_BWD = "embed", "fwd", "head", "bwd", "embed_bwd"
_BACKWARD = {HEAD: 0, BWD: 0, EMBED_BWD: 0, EMBED: 2, FWD: 1}  # lower runs first when both are ready


class ScheduleError(ValueError):
    """The constraints cannot all hold (too many skips for the paths, or memory too tight)."""


@dataclass(frozen=True)
class StageCosts:
    """Seconds per microbatch at speed 1: stage 0's embedding forward, its head forward + loss +
    backward, its embedding backward; one middle stage's forward and backward; one send."""

    embed: float = 0.05
    head: float = 0.3
    embed_bwd: float = 0.05
    fwd: float = 1.0
    bwd: float = 2.0
    comm: float = 0.05

    def of(self, kind: str) -> float:
        return {EMBED: self.embed, HEAD: self.head, EMBED_BWD: self.embed_bwd, FWD: self.fwd, BWD: self.bwd}[kind]


@dataclass(frozen=True)
class Path:
    """A microbatch's route: out of its stage-0 ``home``, through ``hops`` (middle nodes, in order), back home."""

    microbatch: int
    home: Node
    hops: tuple[Node, ...]

    @property
    def stages(self) -> tuple[int, ...]:
        return tuple(n.stage for n in self.hops)

    def skipped(self, stages: int) -> set[int]:
        return set(range(1, stages)) - set(self.stages)

    @property
    def swapped(self) -> bool:
        return list(self.stages) != sorted(self.stages)

    def previous(self, i: int) -> Node:
        """The node before hop ``i`` (home before the first)."""
        return self.home if i == 0 else self.hops[i - 1]

    def following(self, i: int) -> Node:
        """The node after hop ``i`` (home after the last)."""
        return self.home if i == len(self.hops) - 1 else self.hops[i + 1]


@dataclass(frozen=True)
class Op:
    """One operation of the plan: ``kind`` for ``microbatch`` on ``node``; ``src`` sends its input,
    ``dst`` receives its output (``None``: nothing to receive / send)."""

    node: Node
    kind: str
    microbatch: int
    start: float
    end: float
    hop: int = -1  # index of the middle hop in the path (-1: stage-0 work)
    src: Node | None = None
    dst: Node | None = None
    waited: float = 0.0  # time it was ready but its node was busy (a collision when > 0)


@dataclass
class Schedule:
    """A planned iteration: the paths and every node's operations in execution order."""

    config: SkipPipeConfig
    costs: StageCosts
    paths: list[Path]
    ops: dict[Node, list[Op]] = field(default_factory=dict)

    @property
    def makespan(self) -> float:
        return max((o.end for ops in self.ops.values() for o in ops), default=0.0)

    @property
    def collisions(self) -> int:
        return sum(1 for ops in self.ops.values() for o in ops if o.waited > 1e-12)

    @property
    def wait_time(self) -> float:
        return sum(o.waited for ops in self.ops.values() for o in ops)

    def busy(self, node: Node) -> float:
        return sum(o.end - o.start for o in self.ops.get(node, []))

    def idle(self) -> dict[Node, float]:
        return {n: self.makespan - self.busy(n) for n in self.config.nodes()}

    def skip_counts(self) -> dict[int, int]:
        """How many microbatches skip each middle stage."""
        counts = {s: 0 for s in range(1, self.config.stages)}
        for p in self.paths:
            for s in p.skipped(self.config.stages):
                counts[s] += 1
        return counts

    def peak_memory(self) -> dict[Node, int]:
        """The most microbatches whose activations each node holds at once (forward done, backward not)."""
        peak = {}
        for node, ops in self.ops.items():
            events = []
            for o in ops:
                if o.kind in (FWD, EMBED):
                    events.append((o.start, 1))
                elif o.kind in (BWD, EMBED_BWD):
                    events.append((o.end, -1))
            live = best = 0
            for _, d in sorted(events, key=lambda e: (e[0], e[1])):
                live += d
                best = max(best, live)
            peak[node] = best
        return peak

    def check(self) -> None:
        """Raise :class:`ScheduleError` if any constraint of the config is broken."""
        cfg = self.config
        n = cfg.microbatches * cfg.replicas
        if sorted(p.microbatch for p in self.paths) != list(range(n)):
            raise ScheduleError("every microbatch needs exactly one path")
        want = cfg.skips_per_stage
        for s, c in self.skip_counts().items():
            expected = 0 if s <= cfg.keep_first else want
            if c != expected:
                raise ScheduleError(f"stage {s} is skipped by {c} microbatches, expected {expected}")
        for p in self.paths:
            if len(p.hops) == 0 or len(p.skipped(cfg.stages)) > cfg.skips_per_path:
                raise ScheduleError(f"path of microbatch {p.microbatch} skips too many stages: {p.stages}")
            if len(set(p.stages)) != len(p.stages) or p.home.stage != 0:
                raise ScheduleError(f"path of microbatch {p.microbatch} is malformed: {p}")
            if list(p.stages[: cfg.keep_first]) != list(range(1, cfg.keep_first + 1)):
                raise ScheduleError(f"path of microbatch {p.microbatch} moves one of the first {cfg.keep_first} stages")
            out_of_place = [i for i, s in enumerate(p.stages) if s != sorted(p.stages)[i]]
            if len(out_of_place) not in (0, 2) or (out_of_place and out_of_place[1] != out_of_place[0] + 1):
                raise ScheduleError(f"path of microbatch {p.microbatch} is not one adjacent swap: {p.stages}")
            if not cfg.cross_replica and any(h.replica != p.home.replica for h in p.hops):
                raise ScheduleError(f"path of microbatch {p.microbatch} leaves its pipeline: {p}")
        for node, peak in self.peak_memory().items():
            limit = cfg.node_memory(node)
            if limit is not None and peak > limit:
                raise ScheduleError(f"{node} holds {peak} microbatches at once, its limit is {limit}")
        for node, ops in self.ops.items():
            for a, b in zip(ops, ops[1:], strict=False):
                if b.start < a.end - 1e-9:
                    raise ScheduleError(f"{node} runs two operations at once: {a} and {b}")

    def table(self) -> str:
        """One row per microbatch (path and skipped stages), then per-node load and idle time."""
        cfg = self.config
        lines = [f"SkipPipe schedule: {cfg.stages} stages x {cfg.replicas} replicas, {len(self.paths)} microbatches, "
                 f"skip ratio {cfg.skip_ratio:g}, makespan {self.makespan:.3f}, collisions {self.collisions} "
                 f"(waited {self.wait_time:.3f})", "", "| microbatch | path | skipped | swapped |", "|---|---|---|---|"]
        for p in sorted(self.paths, key=lambda p: p.microbatch):
            route = " -> ".join(str(x) for x in (p.home, *p.hops, p.home))
            lines.append(f"| {p.microbatch} | {route} | {sorted(p.skipped(cfg.stages)) or '-'} | "
                         f"{'yes' if p.swapped else ''} |")
        lines += ["", "| node | speed | operations | busy | idle | peak memory |", "|---|---|---|---|---|---|"]
        peak, idle = self.peak_memory(), self.idle()
        for node in cfg.nodes():
            lines.append(f"| {node} | {cfg.node_speed(node):g} | {len(self.ops.get(node, []))} | {self.busy(node):.3f} | "
                         f"{idle[node]:.3f} | {peak.get(node, 0)} |")
        return "\n".join(lines) + "\n"

    def plot(self, path: str | FilePath, title: str | None = None) -> FilePath:
        """A Gantt chart: one row per node, one bar per operation (forward light, backward dark)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        nodes = self.config.nodes()
        fig, ax = plt.subplots(figsize=(10, 0.45 * len(nodes) + 1.5))
        cmap = plt.get_cmap("tab20")
        for y, node in enumerate(nodes):
            for o in self.ops.get(node, []):
                dark = o.kind in (BWD, HEAD, EMBED_BWD)
                ax.barh(y, o.end - o.start, left=o.start, color=cmap(o.microbatch % 20), alpha=1.0 if dark else 0.45,
                        edgecolor="black", linewidth=0.3)
        ax.set_yticks(range(len(nodes)), [f"{n} (x{self.config.node_speed(n):g})" for n in nodes])
        ax.invert_yaxis()
        ax.set_xlabel("time (planned, s)")
        ax.set_title(title or f"skip ratio {self.config.skip_ratio:g}: makespan {self.makespan:.2f}, "
                     f"{self.collisions} collisions")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return FilePath(path)


def _skips(cfg: SkipPipeConfig, n: int, rng: random.Random) -> list[set[int]]:
    want = cfg.skips_per_stage
    skippable = list(range(cfg.keep_first + 1, cfg.stages))
    middle = cfg.stages - 1
    chosen: list[set[int]] = [set() for _ in range(n)]
    order = skippable[:]
    rng.shuffle(order)
    for s in order:
        free = [i for i in range(n) if len(chosen[i]) < cfg.skips_per_path and len(chosen[i]) < middle - 1]
        if len(free) < want:
            raise ScheduleError(f"stage {s} must be skipped by {want} of {n} microbatches but only {len(free)} paths "
                                f"can skip another stage (max_skips={cfg.skips_per_path}); raise max_skips or lower "
                                "skip_ratio")
        rng.shuffle(free)
        free.sort(key=lambda i: len(chosen[i]))
        for i in free[:want]:
            chosen[i].add(s)
    return chosen


def _order(cfg: SkipPipeConfig, visited: list[int], rng: random.Random) -> list[int]:
    movable = [i for i in range(len(visited) - 1) if visited[i] > cfg.keep_first]
    if movable and rng.random() < cfg.swap_prob:
        i = rng.choice(movable)
        visited[i], visited[i + 1] = visited[i + 1], visited[i]
    return visited


@dataclass(order=True)
class _Ready:
    priority: int
    ready: float
    microbatch: int
    seq: int
    kind: str = field(compare=False)
    hop: int = field(compare=False)  # index of the middle hop (-1 for stage-0 work)


def _simulate(cfg: SkipPipeConfig, costs: StageCosts, homes: list[Node], stage_lists: list[list[int]]) -> Schedule:
    n = len(homes)
    hops: list[list[Node | None]] = [[None] * len(s) for s in stage_lists]
    ops: dict[Node, list[Op]] = defaultdict(list)
    busy_until: dict[Node, float] = defaultdict(float)
    queues: dict[Node, list[_Ready]] = defaultdict(list)
    live: dict[Node, int] = defaultdict(int)
    waiting_mem: list[tuple[float, int, int]] = []  # (ready time, microbatch, hop) blocked by memory
    events: list[tuple[float, int, str, object]] = []
    seq = 0

    def push_event(t: float, kind: str, payload: object) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, payload))

    def enqueue(node: Node, t: float, kind: str, mb: int, hop: int) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(queues[node], _Ready(_BACKWARD[kind], t, mb, seq, kind, hop))
        push_event(t, "try", node)

    def route(t: float, mb: int, hop: int) -> bool:
        stage = stage_lists[mb][hop]
        home = homes[mb]
        options = [Node(stage, r) for r in range(cfg.replicas) if cfg.cross_replica or r == home.replica]
        roomy = [x for x in options if cfg.node_memory(x) is None or live[x] < cfg.node_memory(x)]
        if not roomy:
            return False
        # earliest estimated start: when the node is free plus the work already queued there
        def est(x: Node) -> tuple[float, float]:
            queued = sum(costs.of(q.kind) * cfg.node_speed(x) for q in queues[x])
            return (max(t, busy_until[x]) + queued + costs.fwd * cfg.node_speed(x), x.replica)

        node = min(roomy, key=est)
        hops[mb][hop] = node
        live[node] += 1
        enqueue(node, t, FWD, mb, hop)
        return True

    pending: dict[Node, list[int]] = defaultdict(list)
    for mb in range(n):
        pending[homes[mb]].append(mb)

    def admit(home: Node, t: float) -> None:
        """Start new microbatches at ``home`` while it has room for their embeddings' activations."""
        limit = cfg.node_memory(home)
        while pending[home] and (limit is None or live[home] < limit):
            mb = pending[home].pop(0)
            live[home] += 1
            enqueue(home, t, EMBED, mb, -1)

    for home in list(pending):
        admit(home, 0.0)
    done = 0
    while events:
        t, _, kind, payload = heapq.heappop(events)
        if kind == "try":
            node = payload
            if busy_until[node] > t + 1e-12 or not queues[node]:
                continue
            item = heapq.heappop(queues[node])
            mb, k = item.microbatch, item.kind
            dur = costs.of(k) * cfg.node_speed(node)
            start = max(t, item.ready)
            op = Op(node, k, mb, start, start + dur, item.hop, waited=start - item.ready)
            ops[node].append(op)
            busy_until[node] = op.end
            push_event(op.end, "done", op)
            push_event(op.end, "try", node)
        elif kind == "done":
            op = payload
            mb = op.microbatch
            arrive = op.end + costs.comm
            if op.kind == EMBED:
                if not route(op.end + costs.comm, mb, 0):
                    waiting_mem.append((arrive, mb, 0))
            elif op.kind == FWD:
                hop = stage_lists[mb].index(op.node.stage)
                if hop + 1 < len(stage_lists[mb]):
                    if not route(arrive, mb, hop + 1):
                        waiting_mem.append((arrive, mb, hop + 1))
                else:
                    enqueue(homes[mb], arrive, HEAD, mb, -1)
            elif op.kind == HEAD:
                enqueue(hops[mb][-1], arrive, BWD, mb, len(hops[mb]) - 1)
            elif op.kind == BWD:
                hop = hops[mb].index(op.node)
                live[op.node] -= 1
                if hop > 0:
                    enqueue(hops[mb][hop - 1], arrive, BWD, mb, hop - 1)
                else:
                    enqueue(homes[mb], arrive, EMBED_BWD, mb, -1)
                blocked, waiting_mem[:] = waiting_mem[:], []
                for ready, wmb, whop in blocked:
                    if not route(max(ready, op.end), wmb, whop):
                        waiting_mem.append((ready, wmb, whop))
            elif op.kind == EMBED_BWD:
                live[op.node] -= 1
                done += 1
                admit(op.node, op.end)
    if done != n:
        raise ScheduleError(f"only {done} of {n} microbatches finished: the memory limits {cfg.memory} are too tight "
                            "for these paths (a node cannot hold enough activations); raise them")
    paths = [Path(mb, homes[mb], tuple(h for h in hops[mb])) for mb in range(n)]
    wired = {node: [_wire(o, paths[o.microbatch]) for o in sorted(v, key=lambda o: o.start)] for node, v in ops.items()}
    return Schedule(cfg, costs, paths, wired)


def _wire(op: Op, path: Path) -> Op:
    """Where ``op``'s input comes from and its output goes, on the finished path."""
    if op.kind == EMBED:
        return replace(op, dst=path.hops[0])
    if op.kind == FWD:
        return replace(op, src=path.previous(op.hop), dst=path.following(op.hop))
    if op.kind == HEAD:
        return replace(op, src=path.hops[-1], dst=path.hops[-1])
    if op.kind == BWD:
        return replace(op, src=path.following(op.hop), dst=path.previous(op.hop))
    return replace(op, src=path.hops[0])


def plan(config: SkipPipeConfig, costs: StageCosts | None = None) -> Schedule:
    """The best schedule of ``config.trials`` randomised restarts (shortest makespan, then fewest
    collisions); deterministic for a given config, so every rank plans the same one."""
    costs = costs or (StageCosts(*config.costs) if config.costs is not None else StageCosts())
    n = config.microbatches * config.replicas
    homes = [Node(0, mb % config.replicas) for mb in range(n)]
    best: Schedule | None = None
    for trial in range(config.trials):
        rng = random.Random(config.schedule_seed * 7919 + trial)
        skips = _skips(config, n, rng)
        lists = [_order(config, [s for s in range(1, config.stages) if s not in skips[mb]], rng) for mb in range(n)]
        sched = _simulate(config, costs, homes, lists)
        if best is None or (sched.makespan, sched.collisions) < (best.makespan, best.collisions):
            best = sched
    best.check()
    return best
