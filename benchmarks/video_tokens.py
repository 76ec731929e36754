"""VideoLLM-MoD on ``digits-video``: accuracy vs skipped vision compute, prefill FLOPs, KV, time, streaming (#9).

    python benchmarks/video_tokens.py                                 # zoo digits-video, 100 per type
    python benchmarks/video_tokens.py --model runs/zoo/digits-video   # any from_pretrained folder
    python benchmarks/video_tokens.py --smoke                         # seconds: tiny random model

Configs: the unmodified model; ``mmskip.vision.VideoMoDConfig`` with ``schedules.constant(r)`` (every layer
after the first runs ``trunc(16 r)`` of each frame's 16 tokens) for several ``r``, with the ``"attention"``
and ``"norm"`` signals; p-MoD (``MoDConfig``, PRD, the whole video ranked at once); and peers built here
with hooks (baselines, not library techniques), at the r = 0.2 counts:

* **random**: each frame keeps the same number of tokens per layer, ranked by one seeded random score per
  token (shared by all layers);
* **FastV**: layer 1 ranks each frame's tokens once by layer 0's last-token attention and every later layer
  keeps that same set (the rest are dropped for good);
* **pool 4x4**: fewer tokens instead of skipped layers: each frame's 4x4 token grid is average-pooled to 2x2
  (16 -> 4 tokens a frame) before the language model, and prompts carry 4 placeholders a frame.

Measured per config on the held-out questions (first N of each type; batches hold videos with the same
number of clips): accuracy (argmax of the prefill's last logits vs the one-token answer); *vision compute skipped* = the fraction of (frame token, layer) pairs that
did not run, predicted from the schedule and measured from the routing; prefill FLOPs inside the decoder
layers (``FlopCounterMode``) and KV bytes, predicted (``handle.stats()``) and measured, vs the unmodified
model; prefill speedup = median over ``--repeats`` interleaved pairs (``mmskip.timing.paired``: unmodified
and config, applied once on a copy) of a batch prefill, 1 thread.

Streaming: two-clip held-out videos fed clip by clip through ``mmskip.vision.VideoStream`` (routing decided
as each clip arrives, before the question is known), then the question: accuracy, KV bytes per streamed
frame and seconds per clip, unmodified vs VideoLLM-MoD.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from pathlib import Path
from typing import Any, NamedTuple

import harness
import torch
import torch.nn.functional as F
from _token_meters import layer_flops, paired_prefill, prefill
from _token_peers import fastv_ranking, random_ranking
from mmskip.vision import MoDConfig, VideoMoDConfig, VideoStream

import mmskip
from mmskip import schedules
from mmskip.registry import get_adapter
from mmskip.zoo import video_data as D

SMOKE_MODEL = "tiny-random-video"
RATIOS = (0.5, 0.25, 0.2, 0.125)
PEER_RATIO = 0.2
POOLED = 4  # tokens a frame for the pooling peer


class Setup(NamedTuple):
    name: str
    signal: str
    kind: str  # plain | videomod | pmod | random | fastv | pool
    ratio: float = 1.0


def configs() -> list[Setup]:
    rows = [Setup("unmodified", "-", "plain")]
    for r in RATIOS:
        rows += [Setup(f"VideoMoD r={r}", s, "videomod", r) for s in ("attention", "norm")]
    rows += [
        Setup("p-MoD PRD (whole video)", "attention", "pmod"),
        Setup(f"random r={PEER_RATIO}", "random", "random", PEER_RATIO),
        Setup(f"FastV K=1 r={PEER_RATIO}", "attention@0", "fastv", PEER_RATIO),
        Setup(f"pool 4x4 -> 2x2 ({D.TOKENS_PER_FRAME} -> {POOLED} a frame)", "-", "pool"),
    ]
    return rows


def build_model(name: str):
    if name == SMOKE_MODEL:
        from mmskip.zoo.video_model import make_model

        torch.manual_seed(0)
        return make_model((1, 32, 4, 64)).eval(), D.build_tokenizer()
    if Path(name).is_dir():
        from mmskip.zoo.loaders import load_video

        model, tok = load_video(Path(name))
        return model.eval(), tok
    model, tok = mmskip.zoo.load(name)
    return model.eval(), tok


class Attached:
    """One config applied to the model (``remove()`` restores it)."""

    def __init__(self, model, setup: Setup, seed: int = 0) -> None:
        self.setup, self.handle, self.torch_hooks, self.per_frame = setup, None, [], D.TOKENS_PER_FRAME
        self.inner = None
        adapter = get_adapter(model, "vlm")
        if setup.kind == "pool":
            self.per_frame, self.inner = POOLED, model.model
            original = self.inner.apply_pooling
            self.inner.apply_pooling = lambda x: _pool_more(original(x))
        elif setup.kind == "pmod":
            self.handle = mmskip.apply(model, MoDConfig(signal=setup.signal))
        elif setup.kind != "plain":
            signal = setup.signal if setup.kind == "videomod" else "attention"
            self.handle = mmskip.apply(model, VideoMoDConfig(schedule=schedules.constant(setup.ratio), signal=signal))
            layers = adapter.text.layers
            hooks = {i: layers[i]._diffusers_hook.get_hook(self.handle.hook_name + ".layer")
                     for i in self.handle.state.ratios}
            if setup.kind == "random":
                random_ranking(hooks, seed)
            elif setup.kind == "fastv":
                self.torch_hooks += fastv_ranking(hooks, layers, 1)

    def remove(self) -> None:
        for h in self.torch_hooks:
            h.remove()
        if self.inner is not None:
            del self.inner.apply_pooling  # back to the class's method
        if self.handle is not None:
            self.handle.remove()


def _pool_more(x: torch.Tensor) -> torch.Tensor:
    """(frames, s*s, d) pooled tokens -> (frames, (s/2)^2, d): average 2x2 once more."""
    n, t, d = x.shape
    s = math.isqrt(t)
    return F.avg_pool2d(x.transpose(1, 2).reshape(n, d, s, s), 2).flatten(2).transpose(1, 2)


def prompts(tok, data: D.Batch, idx: list[int], per_frame: int) -> dict[str, torch.Tensor]:
    """Left-padded prefill inputs (no answer) for rows ``idx``, ``per_frame`` placeholders a frame."""
    video = tok.convert_tokens_to_ids(D.VIDEO_TOKEN)
    seqs = [D.prefix_ids(tok) + [video] * ((D.FRAMES * per_frame + 1) * int(data.videos.n_clips[i]))
            + D.question_ids(tok, data.questions[i]) for i in idx]
    width = max(map(len, seqs))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    clips = data.videos.clips()
    return {"input_ids": ids, "attention_mask": mask, "pixel_values_videos": D.pixel_values_videos([clips[i] for i in idx])}


def questions(tok, n_per_type: int) -> D.Batch:
    full = D.heldout_set(tok, max(n_per_type, 500))
    pick = [j for t in D.QTYPES for j in [i for i, q in enumerate(full.qtypes) if q == t][:n_per_type]]
    return D.Batch(full.videos[torch.tensor(pick)], full.input_ids[pick], full.attention_mask[pick],
                   full.labels[pick], full.answer_pos[pick], [full.qtypes[i] for i in pick],
                   [full.questions[i] for i in pick], [full.answers[i] for i in pick])


@torch.no_grad()
def accuracy(model, tok, data: D.Batch, per_frame: int, batch: int) -> tuple[dict[str, float], list[int]]:
    vocab = tok.get_vocab()
    right: dict[str, list[bool]] = {t: [] for t in D.QTYPES}
    preds = [0] * len(data.questions)
    for idx in _batches(data, batch):
        pred = prefill(model, prompts(tok, data, idx, per_frame)).logits[:, -1].argmax(-1).tolist()
        for i, p in zip(idx, pred, strict=True):
            preds[i] = p
            right[data.qtypes[i]].append(p == vocab[data.answers[i]])
    acc = {t: sum(v) / len(v) for t, v in right.items() if v}
    acc["all"] = sum(sum(v) for v in right.values()) / sum(len(v) for v in right.values())
    return acc, preds


def probe_rows(data: D.Batch, size: int) -> list[int]:
    """The probe batch FLOPs are counted on: up to ``size`` two-clip videos, question types interleaved
    (one clip count, so packed MoD rows share a length; left padding, like real batches)."""
    two = [[j for j, q in enumerate(data.qtypes) if q == t and int(data.videos.n_clips[j]) == 2] for t in D.QTYPES]
    return sorted([i for trip in itertools.zip_longest(*two) for i in trip if i is not None][:size])


def _batches(data: D.Batch, size: int) -> list[list[int]]:
    """Row indices in batches of videos with the same number of clips: packed MoD rows must have one
    length, so a row with more frames in a mixed batch keeps extra tokens (see vision/README.md)."""
    out = []
    for clips in sorted(set(data.videos.n_clips.tolist())):
        rows = [i for i in range(len(data.questions)) if int(data.videos.n_clips[i]) == clips]
        out += [rows[s:s + size] for s in range(0, len(rows), size)]
    return out


def vision_skipped(setup: Setup, stats: dict | None, num_layers: int) -> tuple[float, float]:
    """(predicted, measured) fraction of (frame token, layer) pairs that did not run."""
    if setup.kind == "pool":
        return 1 - POOLED / D.TOKENS_PER_FRAME, 1 - POOLED / D.TOKENS_PER_FRAME
    if stats is None:
        return 0.0, 0.0
    layers = stats["layers"]
    if setup.kind == "pmod":
        ratios = schedules.progressive().ratios(num_layers)
        pred = sum(1 - r for r in ratios) / num_layers  # approximately: trunc over the whole video
    else:
        pred = (num_layers - 1) * (1 - int(D.TOKENS_PER_FRAME * setup.ratio) / D.TOKENS_PER_FRAME) / num_layers
    n = max((r["n_vision"] for r in layers.values()), default=0)
    measured = sum(r["n_vision"] - r["kept_vision"] for r in layers.values()) / (num_layers * n) if n else 0.0
    return pred, measured


def run_config(model, tok, setup: Setup, data: D.Batch, probe: list[int], plain: dict, args) -> dict:
    L = get_adapter(model, "vlm").num_layers
    att = Attached(model, setup, seed=args.seed)
    try:
        inp = prompts(tok, data, probe, att.per_frame)
        tokens = inp["input_ids"].numel()
        flops, _, kv = layer_flops(model, inp)
        stats = att.handle.stats() if att.handle is not None else None
        pred_flops = stats["prefill_flops_fraction"] if stats else tokens / plain["tokens"]
        pred_kv = stats["kv_fraction"] if stats else tokens / plain["tokens"]
        skipped = vision_skipped(setup, stats, L)
        acc, preds = accuracy(model, tok, data, att.per_frame, args.eval_batch)
    finally:
        att.remove()
    t = paired_prefill(model, plain["inputs"], inp, lambda twin: Attached(twin, setup, seed=args.seed), args.repeats)
    row = {
        "config": setup.name, "signal": setup.signal, "kind": setup.kind, "ratio": setup.ratio,
        "vision_skipped_predicted": skipped[0], "vision_skipped_measured": skipped[1],
        "flops_predicted": pred_flops, "flops_measured": flops / plain["flops"],
        "kv_predicted": pred_kv, "kv_measured": kv / plain["kv"],
        "prefill_speedup": t.speedup, "prefill_speedup_spread": list(t.spread), "prefill_pairs": t.pairs,
        "prefill_flops_bound": plain["flops"] / flops if flops else None,
        "prefill_bound_warning": t.bound_warning(flops / plain["flops"]), "prefill_s": t.seconds,
        "prefill_s_plain": t.baseline_seconds,
        **{f"acc_{t}": v for t, v in acc.items()},
        "acc_all_se": math.sqrt(acc["all"] * (1 - acc["all"]) / len(preds)),
        "agree_unmodified": None if plain.get("preds") is None
        else sum(a == b for a, b in zip(preds, plain["preds"], strict=True)) / len(preds),
    }
    if setup.kind == "plain":
        plain["preds"], row["agree_unmodified"] = preds, 1.0
    return row


@torch.no_grad()
def stream_eval(model, tok, data: D.Batch, n: int, setup: Setup | None) -> dict[str, Any]:
    """Two-clip videos fed clip by clip, then the question: accuracy, KV per frame, seconds per clip."""
    vocab = tok.get_vocab()
    rows = [i for i in range(len(data.questions)) if int(data.videos.n_clips[i]) == 2][:n]
    handle = None
    if setup is not None:
        handle = mmskip.apply(model, VideoMoDConfig(schedule=schedules.constant(setup.ratio), signal=setup.signal))
    right, per_frame, clip_s = 0, [], []
    try:
        for i in rows:
            stream = VideoStream(model, prefix=torch.tensor(D.prefix_ids(tok)))
            for clip in D.pixel_values_videos([data.videos.clips()[i]]):
                clip_s.append(harness.once(lambda c=clip, s=stream: s.add_clip(c))[0])
            per_frame.append(stream.kv_bytes() / stream.frames)
            got = stream.ask(torch.tensor(D.question_ids(tok, data.questions[i])))
            right += int(got[0, 0]) == vocab[data.answers[i]]
    finally:
        if handle is not None:
            handle.remove()
    return {"config": "unmodified" if setup is None else f"{setup.name} ({setup.signal})", "videos": len(rows),
            "acc": right / max(len(rows), 1), "kv_bytes_per_frame": statistics.mean(per_frame),
            "s_per_clip": statistics.median(clip_s)}


def main(argv: list[str] | None = None) -> dict:
    p = harness.arguments(__doc__, repeats=5, threads=None, smoke=f"seconds: {SMOKE_MODEL}, 4 questions per type")
    p.add_argument("--model", default="digits-video", help="zoo name or from_pretrained folder")
    p.add_argument("--n", type=int, default=100, help="held-out questions per type")
    p.add_argument("--batch", type=int, default=16, help="prefill batch for FLOPs, KV and timing")
    p.add_argument("--eval-batch", type=int, default=50)
    p.add_argument("--stream", type=int, default=100, help="two-clip videos for the streaming run")
    p.add_argument("--seed", type=int, default=0, help="random peer's seed")
    args = p.parse_args(argv)
    if args.smoke:
        args.model = args.model if args.model != "digits-video" else SMOKE_MODEL
        args.n, args.batch, args.repeats, args.stream = 4, 4, 3, 2
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model, tok = build_model(args.model)
    data = questions(tok, args.n)
    probe = probe_rows(data, args.batch)
    plain_in = prompts(tok, data, probe, D.TOKENS_PER_FRAME)
    f_in, _, kv = layer_flops(model, plain_in)
    plain = {"inputs": plain_in, "tokens": plain_in["input_ids"].numel(), "flops": f_in, "kv": kv}
    rows = [run_config(model, tok, s, data, probe, plain, args) for s in configs()]
    best = next(s for s in configs() if s.kind == "videomod" and s.ratio == PEER_RATIO)
    streams = [stream_eval(model, tok, data, args.stream, None)]
    streams += [stream_eval(model, tok, data, args.stream, best._replace(signal=s)) for s in ("attention", "norm")]
    meta = {"model": args.model, "n_per_type": args.n, "probe_batch": len(probe), "repeats": args.repeats,
            "threads": 1, "num_layers": get_adapter(model, "vlm").num_layers,
            "tokens_per_frame": D.TOKENS_PER_FRAME, "probe_prompt_tokens": plain["tokens"] // len(probe),
            "torch": torch.__version__, "machine": harness.machine(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "seconds": round(time.perf_counter() - t0, 1)}
    table = _table(rows, streams, meta)
    print("\n" + table)
    res = {"meta": meta, "rows": rows, "stream": streams}
    if args.smoke and not args.out:
        return res
    harness.write(args.out or harness.RESULTS / "video_tokens.json", res, table, lambda png: _plot(rows, meta, png),
                  indent=2)
    return res


def _table(rows: list[dict], streams: list[dict], meta: dict) -> str:
    lines = [
        f"{meta['model']}: {meta['n_per_type']} held-out questions per type ({meta['num_layers']} decoder layers, "
        f"{meta['tokens_per_frame']} tokens a frame); FLOPs/KV/time on a batch-{meta['probe_batch']} prefill of two-clip videos "
        f"({meta['probe_prompt_tokens']} tokens a row), CPU 1 thread, median of {meta['repeats']} pairs. "
        f"1 s.e. of acc all: ±{max(r['acc_all_se'] for r in rows):.3f} or less.",
        "",
        "| config | signal | vision compute skipped pred / meas | prefill FLOPs pred / meas | KV pred / meas "
        f"| prefill speedup | acc {' / '.join(D.QTYPES)} / all | agree |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['signal']} | {r['vision_skipped_predicted']:.3f} / {r['vision_skipped_measured']:.3f}"
            f" | {r['flops_predicted']:.3f} / {r['flops_measured']:.3f} | {r['kv_predicted']:.3f} / "
            f"{r['kv_measured']:.3f} | {r['prefill_speedup']:.2f}x | "
            + " / ".join(f"{r['acc_' + t]:.2f}" for t in D.QTYPES)
            + f" / {r['acc_all']:.3f} | {r['agree_unmodified']:.2f} |")
    lines += ["", f"Streaming ({streams[0]['videos']} two-clip videos, clip by clip, question at the end):", "",
              "| config | accuracy | KV bytes per frame | s per clip |", "|---|---:|---:|---:|"]
    for s in streams:
        lines.append(f"| {s['config']} | {s['acc']:.3f} | {s['kv_bytes_per_frame']:.0f} | {s['s_per_clip']:.4f} |")
    return "\n".join(lines)


def _plot(rows: list[dict], meta: dict, path: Path) -> None:
    fig = harness.figure(figsize=(8, 5.5))
    ax = fig.add_subplot()
    markers = {"plain": "*", "videomod": "o", "pmod": "P", "fastv": "s", "random": "x", "pool": "D"}
    for r in rows:
        label = f"{r['config']} ({r['signal']})" if r["signal"] != "-" else r["config"]
        ax.scatter(r["vision_skipped_measured"], r["acc_all"], marker=markers[r["kind"]], s=70, label=label)
    ax.set_xlabel("vision compute skipped (fraction of frame-token x layer pairs)")
    ax.set_ylabel("held-out accuracy (all question types)")
    ax.set_title(f"{meta['model']}: VideoLLM-MoD and peers, {meta['n_per_type']} questions per type")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
