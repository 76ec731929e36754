"""One SkipPipe process: its stage of the model, its planned operations, point-to-point sends.

Every rank plans the same :class:`~mmskip.train.skippipe.schedule.Schedule` and executes its own
node's operations in the planned order: activations go forward and gradients back with
``torch.distributed`` ``isend`` / ``irecv`` (gloo, CPU tensors), tagged by microbatch.
Because every node follows one valid linearisation of the plan, blocking receives cannot deadlock.
After the iteration each stage's gradients are summed over its replicas (``all_reduce`` in the
stage's group), clipped and stepped. A slow node is simulated by sleeping ``(speed − 1) ×`` each
operation's measured time after it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from itertools import combinations
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..lr_schedule import warmup_cosine
from .config import Node, SkipPipeConfig
from .schedule import BWD, EMBED, EMBED_BWD, FWD, HEAD, Schedule, StageCosts, plan
from .stages import join, run_path, split

__all__ = ["TrainSpec", "run_worker"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSpec:
    """What every rank trains.

    Args:
        layers, width: the decoder (``mmskip.zoo.lm_model.make_model``: a Llama, ``d // 32`` heads, tied head).
        seq: tokens per window; ``microbatch``: windows per microbatch.
        iterations: optimizer steps (each: ``microbatches × replicas`` microbatches); ``time_limit_s``
            stops earlier, at the same iteration on every rank.
        lr: peak AdamW learning rate (warm-up over the first 10 % of the run, cosine to 10 %; the run is
            ``iterations``, or ``time_limit_s`` of wall time when that comes first).
        eval_windows: held-out windows for the final perplexities (0: none).
        seed: model init and data order (the same on every rank).
        data: ``"stdlib"`` (the zoo's Python-stdlib text with ``stdlib-lm``'s tokenizer) or ``"synthetic"``
            (``vocab`` tokens, each mostly a fixed function of the one before: learnable in a few steps, for tests).
        out: folder for ``result.json`` (and ``model.safetensors`` with ``save_model``).
        fail_rank: a rank that raises on purpose after its first iteration (tests of failing fast).
        grads_out: write every stage's gradients after the first iteration here, then stop (tests).
    """

    layers: int = 8
    width: int = 128
    seq: int = 64
    microbatch: int = 4
    iterations: int = 10
    time_limit_s: float | None = None
    lr: float = 3e-3
    eval_windows: int = 64
    seed: int = 0
    data: str = "stdlib"
    vocab: int = 512
    out: str | None = None
    save_model: bool = False
    fail_rank: int | None = None
    grads_out: str | None = None


def _data(spec: TrainSpec) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(train stream, held-out stream, vocabulary size)."""
    if spec.data == "synthetic":  # a learnable stream: each token is a fixed function of the one before
        g = torch.Generator().manual_seed(spec.seed)
        successor = torch.randperm(spec.vocab, generator=g)
        stream = torch.empty(24000, dtype=torch.int64)
        stream[0] = 0
        for i in range(1, len(stream)):
            stream[i] = successor[stream[i - 1]] if torch.rand(1, generator=g).item() > 0.1 else \
                torch.randint(0, spec.vocab, (1,), generator=g).item()
        return stream[:20000], stream[20000:], spec.vocab
    if spec.data != "stdlib":
        raise ValueError(f"data must be 'stdlib' or 'synthetic', got {spec.data!r}")
    from transformers import AutoTokenizer

    from mmskip.eval.lm import token_stream
    from mmskip.zoo import path
    from mmskip.zoo.stdlib_data import read_texts

    tok = AutoTokenizer.from_pretrained(path("stdlib-lm"))
    return token_stream(tok, read_texts("train")), token_stream(tok, read_texts("test")), len(tok)


def _model(spec: TrainSpec, vocab: int) -> torch.nn.Module:
    from mmskip.zoo.lm_model import make_model

    torch.manual_seed(spec.seed)
    return make_model(vocab, layers=spec.layers, d=spec.width)


def _batch(stream: torch.Tensor, spec: TrainSpec, iteration: int, mb: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(spec.seed * 1_000_003 + iteration * 10_007 + mb)
    starts = torch.randint(0, len(stream) - spec.seq, (spec.microbatch,), generator=g)
    return torch.stack([stream[s:s + spec.seq] for s in starts.tolist()])


class _Worker:
    def __init__(self, cfg: SkipPipeConfig, spec: TrainSpec, schedule: Schedule) -> None:
        self.cfg, self.spec, self.schedule = cfg, spec, schedule
        self.rank = dist.get_rank()
        self.node = Node(self.rank % cfg.stages, self.rank // cfg.stages)
        self.train_ids, self.val_ids, vocab = _data(spec)
        self.model = _model(spec, vocab)
        self.part = split(self.model, cfg.stages)[self.node.stage]
        self.params = [p for p in self.part.parameters()]
        self.opt = torch.optim.AdamW(self.params, lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.1)
        # every rank creates every stage group, in the same order (a collective requirement)
        self.groups = [dist.new_group([r * cfg.stages + s for r in range(cfg.replicas)]) for s in range(cfg.stages)]
        self.total_mb = cfg.microbatches * cfg.replicas
        self.shape = (spec.microbatch, spec.seq, spec.width)

    def _send(self, t: torch.Tensor, node: Node, tag: int, pending: list) -> None:
        pending.append(dist.isend(t.detach().contiguous(), node.rank(self.cfg.stages), tag=tag))

    def _recv(self, node: Node, tag: int) -> torch.Tensor:
        buf = torch.empty(self.shape)
        dist.irecv(buf, node.rank(self.cfg.stages), tag=tag).wait()
        return buf

    def iteration(self, it: int) -> float:
        """Run this node's planned operations for iteration ``it``; returns its summed microbatch loss."""
        acts: dict[int, Any] = {}
        ids: dict[int, torch.Tensor] = {}
        pending: list = []
        loss_sum = 0.0
        speed = self.cfg.node_speed(self.node)
        for op in self.schedule.ops.get(self.node, []):
            t0 = time.perf_counter()
            mb = op.microbatch
            fwd_tag, bwd_tag = 2 * mb, 2 * mb + 1
            if op.kind == EMBED:
                ids[mb] = _batch(self.train_ids, self.spec, it, mb)
                h = self.part.embed(ids[mb])
                acts[mb] = h
                self._send(h, op.dst, fwd_tag, pending)
            elif op.kind == FWD:
                x = self._recv(op.src, fwd_tag).requires_grad_()
                y = self.part(x)
                acts[mb] = (x, y)
                self._send(y, op.dst, fwd_tag, pending)
            elif op.kind == HEAD:
                x = self._recv(op.src, fwd_tag).requires_grad_()
                loss = self.part.loss(x, ids[mb])
                (loss / self.total_mb).backward()
                loss_sum += loss.item()
                self._send(x.grad, op.dst, bwd_tag, pending)
            elif op.kind == BWD:
                g = self._recv(op.src, bwd_tag)
                x, y = acts.pop(mb)
                y.backward(g)
                self._send(x.grad, op.dst, bwd_tag, pending)
            elif op.kind == EMBED_BWD:
                g = self._recv(op.src, bwd_tag)
                acts.pop(mb).backward(g)
            if speed > 1:
                time.sleep((speed - 1) * (time.perf_counter() - t0))
        for p in pending:
            p.wait()
        return loss_sum

    def step(self, progress: float) -> None:
        """Sum gradients over the stage's replicas, clip, and step at the learning rate for ``progress``
        (the share of the run done: iterations, or wall time under ``time_limit_s``; the same on every rank)."""
        for group in self.opt.param_groups:
            group["lr"] = self.spec.lr * _lr_factor(progress)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if self.cfg.replicas > 1:
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat, group=self.groups[self.node.stage])
            i = 0
            for p, g in zip(self.params, grads, strict=True):
                p.grad = flat[i:i + g.numel()].view_as(g).clone()
                i += g.numel()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _lr_factor(progress: float) -> float:
    """Linear warm-up over the first 10 % of the run (at least 1 %), then cosine decay to 10 %."""
    return warmup_cosine(progress, 1.0, 0.1, 0.1, decay_after_warmup=True, count_from=0, ramp_min=0.01)


def _gather_state(worker: _Worker) -> dict[int, dict[str, torch.Tensor]] | None:
    """Replica 0 of every stage sends its weights to rank 0."""
    state = {k: v.detach().clone() for k, v in worker.part.state_dict().items()} if worker.node.replica == 0 else None
    got: list = [None] * dist.get_world_size()
    dist.gather_object((worker.node.stage, state), got if worker.rank == 0 else None, dst=0)
    if worker.rank != 0:
        return None
    return {s: sd for s, sd in got if sd is not None}


def evaluate(model: torch.nn.Module, stages: int, val: torch.Tensor, spec: TrainSpec) -> dict[str, float]:
    """Held-out perplexity with every middle stage, and with half of them skipped (mean over the ways)."""
    parts = split(model, stages)
    model.eval()
    n = min(spec.eval_windows, (len(val) - 1) // spec.seq)
    windows = val[: n * spec.seq].view(n, spec.seq)

    @torch.no_grad()
    def ppl(path: list[int]) -> float:
        losses = [run_path(parts, windows[i:i + 16], path).item() * len(windows[i:i + 16]) for i in range(0, n, 16)]
        return math.exp(sum(losses) / n)

    middle = list(range(1, stages))
    half = [sorted(c) for c in combinations(middle, len(middle) - len(middle) // 2)]
    halves = [ppl(p) for p in half]
    return {"val_ppl_full": ppl(middle), "val_ppl_half": sum(halves) / len(halves),
            "val_ppl_half_each": dict(zip([",".join(map(str, p)) for p in half], halves, strict=True))}


def run_worker(cfg: SkipPipeConfig, spec: TrainSpec, costs: StageCosts | None = None) -> dict[str, Any] | None:
    """Train as this process's rank (``torch.distributed`` must be initialised, or torchrun's environment
    set); rank 0 returns the run's record and writes ``spec.out/result.json``."""
    owned = not dist.is_initialized()
    if owned:
        # the runtime keeps stages and buffers on the CPU (gloo); a CUDA/nccl runtime is not built
        dist.init_process_group("gloo", timeout=timedelta(seconds=int(os.environ.get("SKIPPIPE_TIMEOUT", "300"))))
    record = _train(cfg, spec, costs)
    if owned:
        # leave together and tear gloo down explicitly: a rank that exits with its process group alive
        # can die of SIGABRT in gloo's destructors at interpreter shutdown ("terminate called without
        # an active exception"), intermittently, after its work is done
        dist.barrier()
        dist.destroy_process_group()
    return record


def _train(cfg: SkipPipeConfig, spec: TrainSpec, costs: StageCosts | None) -> dict[str, Any] | None:
    if dist.get_world_size() != cfg.world_size:
        raise ValueError(f"the config needs {cfg.world_size} processes ({cfg.stages} stages x {cfg.replicas} replicas), "
                         f"the job has {dist.get_world_size()}; launch with --nproc-per-node {cfg.world_size}")
    torch.set_num_threads(1)
    schedule = plan(cfg, costs)
    worker = _Worker(cfg, spec, schedule)
    history: list[dict[str, float]] = []
    t_start = time.perf_counter()
    for it in range(spec.iterations):
        dist.barrier()
        t0 = time.perf_counter()
        loss = worker.iteration(it)
        if spec.grads_out is not None:
            _dump_grads(worker, Path(spec.grads_out))
            return None
        # progress of the run, agreed by all ranks (the slowest clock), sets the learning rate
        elapsed = time.perf_counter() - t_start
        frac = torch.tensor([it / spec.iterations if spec.time_limit_s is None
                             else max(it / spec.iterations, elapsed / spec.time_limit_s)])
        dist.all_reduce(frac, op=dist.ReduceOp.MAX)
        worker.step(frac.item())
        total = torch.tensor([loss])
        dist.all_reduce(total)
        dist.barrier()
        dt = time.perf_counter() - t0
        history.append({"iteration": it, "loss": total.item() / worker.total_mb, "seconds": dt})
        if worker.rank == 0 and (it % 10 == 0 or it == spec.iterations - 1):
            logger.info("iteration %d: loss %.4f, %.3f s", it, history[-1]["loss"], dt)
        if spec.fail_rank == worker.rank:
            raise RuntimeError(f"rank {worker.rank} fails on purpose (fail_rank) after iteration {it}")
        stop = torch.tensor([float(spec.time_limit_s is not None and time.perf_counter() - t_start > spec.time_limit_s)])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)  # every rank stops at the same iteration
        if stop.item() > 0:
            break
    state = _gather_state(worker)
    if worker.rank != 0:
        return None
    model = join(_model(spec, worker.model.config.vocab_size), state, cfg.stages)
    record = {"config": asdict(cfg), "spec": asdict(spec), "history": history,
              "iterations": len(history), "train_seconds": time.perf_counter() - t_start,
              "planned_makespan": schedule.makespan, "planned_collisions": schedule.collisions,
              "skip_counts": schedule.skip_counts()}
    if spec.eval_windows:
        record.update(evaluate(model, cfg.stages, worker.val_ids, spec))
    if spec.out is not None:
        out = Path(spec.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
        if spec.save_model:
            model.save_pretrained(out / "model", safe_serialization=True)
    return record


def _dump_grads(worker: _Worker, folder: Path) -> None:
    """This rank's gradients under the full model's parameter names (tests compare them)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    names = {id(p): n for n, p in worker.model.named_parameters()}
    grads = {names[id(p)]: (p.grad if p.grad is not None else torch.zeros_like(p)).contiguous()
             for p in worker.part.parameters()}
    save_file(grads, str(folder / f"rank{worker.rank}.safetensors"))
