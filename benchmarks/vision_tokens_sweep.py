"""Which vision-token router is best, where, and by how much: a keep-ratio sweep on ``digits-llava``
(p-MoD) or ``digits-video`` (VideoLLM-MoD).

    python benchmarks/vision_tokens_sweep.py                      # zoo digits-llava, 850 questions per type
    python benchmarks/vision_tokens_sweep.py --family video       # zoo digits-video (VideoLLM-MoD)
    python benchmarks/vision_tokens_sweep.py --model runs/zoo/x   # any from_pretrained folder (--family video
                                                                  # for a LLaVA-OneVision one)
    python benchmarks/vision_tokens_sweep.py --routers 0.25=runs/r  # add routers trained for keep 0.25
    python benchmarks/vision_tokens_sweep.py --smoke [--family video]  # seconds: tiny random model

At every keep ratio ``r`` (vision tokens kept in decoder layers 1..L-1; layer 0 keeps all, as
p-MoD's schedules do) the same held-out questions are answered by:

* **p-MoD** (image: ``MoDConfig``, each image's tokens ranked together) or **VideoLLM-MoD** (video:
  ``VideoMoDConfig``, each frame keeps ``trunc(16 r)`` of its 16 tokens), both with
  ``schedules.explicit``, ranking by each training-free signal (``attention``: the last prompt
  token's attention, FastV's signal; ``norm``: the token's relative change over the previous layer);
* **random**: the same per-layer counts, one seeded random score per token (a dropped token stays
  dropped), i.e. what any router must beat;
* **pool**: each image's 8x8 grid (the projector's output) or each frame's 4x4 grid (after
  LLaVA-OneVision's pooling) average-pooled to ``r`` of its tokens (1x2, 2x2, 2x4, 4x4: 1/2 to
  1/16) in every layer, layer 0 included, with as many placeholder tokens in the prompt;
* trained routers given with ``--routers RATIO=FOLDER`` (``signal="router"``, at the ratio they
  were trained for; repeat the flag's pairs for several folders). Routers trained with a LoRA
  (``train --lora``: the folder holds ``lora.safetensors``) run on a copy of the model with that LoRA
  merged (``merged_with_lora``), as they were trained; its agreement is still against the unmodified model.

Reported per config: accuracy per question type and overall with its standard error, agreement
with the unmodified model's answer, and the decoder's prefill FLOPs fraction (counted with
``torch.utils.flop_counter`` inside the decoder layers over one probe batch). For each ratio the
table names the best config and its margin over random dropping in units of the paired standard
error (the configs answer the same questions, so the difference's error is what counts). Accuracy
only: prefill time is measured by ``benchmarks/vision_tokens.py`` and ``benchmarks/video_tokens.py``.
What differs between the two families is declared in ``_sweep_families.py``. Video FLOPs are counted
on two-clip videos (one clip count a batch, as ``video_tokens.py`` does).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import harness
import torch
from _sweep_families import FAMILIES, Family, family_for
from _token_meters import layer_flops
from _token_peers import random_ranking
from mmskip.vision.pmod.lora import LORA_WEIGHTS, merged_with_lora
from tqdm.auto import tqdm

import mmskip
from mmskip.registry import get_adapter

POOLS = {0.5: (1, 2), 0.25: (2, 2), 0.125: (2, 4), 0.0625: (4, 4)}  # keep ratio -> pooling window
SIGNALS = ("attention", "norm")


class Applied:
    """One sweep config on the model; :meth:`remove` restores the model. ``n_tokens``: the vision tokens
    of an image (a frame) the prompts carry."""

    def __init__(self, model, family: Family, kind: str, ratio: float, signal: str = "",
                 routers: str | None = None, seed: int = 0) -> None:
        self.handle, self.unpool, self.n_tokens = None, None, family.n_tokens
        adapter = get_adapter(model, "vlm")
        if kind == "pool":
            kh, kw = POOLS[ratio]
            self.n_tokens = family.n_tokens // (kh * kw)
            self.unpool = family.pool(model, (kh, kw))
        elif kind != "plain":
            ratios = [1.0] + [ratio] * (adapter.num_layers - 1)
            cfg = family.config(ratios, "router" if routers else signal, routers)
            self.handle = mmskip.apply(model, cfg)
            if kind == "random":
                layers = adapter.text.layers
                random_ranking({i: layers[i]._diffusers_hook.get_hook(self.handle.hook_name + ".layer")
                                for i in self.handle.state.ratios}, seed)

    def remove(self) -> None:
        if self.unpool is not None:
            self.unpool()
        if self.handle is not None:
            self.handle.remove()


def setups(ratios: list[float], routers: list[tuple[float, str]], method: str = "p-MoD") -> list[dict[str, Any]]:
    """The configs in sweep order: the unmodified model, then per ratio ``method`` with each signal (and
    trained routers), random dropping and pooling."""
    out = [{"name": "unmodified", "kind": "plain", "ratio": 1.0}]
    for r in ratios:
        out += [{"name": f"{method} {s}", "kind": "mod", "ratio": r, "signal": s} for s in SIGNALS]
        for ratio, folder in routers:
            if ratio == r:
                lora = (Path(folder) / LORA_WEIGHTS).is_file()
                out.append({"name": f"{method} router" + (" + LoRA" if lora else ""), "kind": "mod", "ratio": r,
                            "routers": folder, "lora": lora})
        out.append({"name": "random", "kind": "random", "ratio": r, "signal": "attention"})  # ranking replaced
        if r in POOLS:
            kh, kw = POOLS[r]
            out.append({"name": f"pool {kh}x{kw}", "kind": "pool", "ratio": r})
    return out


def run(model, tok, family: Family, data: Any, probe: list[int], setup: dict[str, Any], plain: dict[str, Any],
        args: Any) -> dict[str, Any]:
    """One config's row: accuracy per type, its per-question right/wrong, FLOPs fraction, agreement."""
    if setup.get("lora"):  # routers trained with a LoRA: on the model with it merged, as trained
        model = merged_with_lora(model, setup["routers"])
    att = Applied(model, family, setup["kind"], setup["ratio"], setup.get("signal", ""), setup.get("routers"),
                  args.seed)
    try:
        flops = layer_flops(model, family.inputs(tok, data, probe, att.n_tokens))[0]
        acc, preds = family.accuracy(model, tok, data, att.n_tokens, args.eval_batch)
    finally:
        att.remove()
    vocab = tok.get_vocab()
    right = [p == vocab[a] for p, a in zip(preds, data.answers, strict=True)]
    row = {**setup, "flops": flops, "flops_fraction": flops / plain["flops"] if plain else 1.0, "right": right,
           **{f"acc_{k}": v for k, v in acc.items()},
           "acc_all_se": math.sqrt(acc["all"] * (1 - acc["all"]) / len(preds)),
           "agree_unmodified": sum(a == b for a, b in zip(preds, plain["preds"], strict=True)) / len(preds)
           if plain else 1.0, "preds": preds}
    return row


def paired_margin(a: list[bool], b: list[bool]) -> tuple[float, float]:
    """Accuracy of ``a`` minus ``b`` on the same questions, and the standard error of that difference."""
    d = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / max(1, len(d) - 1)
    return mean, math.sqrt(var / len(d))


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per ratio: the best config, and its margin over random dropping in paired standard errors."""
    out = []
    for r in sorted({row["ratio"] for row in rows if row["kind"] != "plain"}, reverse=True):
        at = [row for row in rows if row["ratio"] == r and row["kind"] != "plain"]
        best = max(at, key=lambda row: row["acc_all"])
        rand = next(row for row in at if row["kind"] == "random")
        diff, se = paired_margin(best["right"], rand["right"])
        out.append({"ratio": r, "best": best["name"], "best_acc": best["acc_all"], "random_acc": rand["acc_all"],
                    "margin": diff, "margin_se": se, "margin_in_se": diff / se if se > 0 else None})
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = harness.arguments(__doc__, repeats=None, threads=1, full_doc=True,
                          smoke="seconds: the family's tiny random model, 4 questions per type, two ratios")
    p.add_argument("--family", choices=sorted(FAMILIES), default=None,
                   help="image (p-MoD, default) or video (VideoLLM-MoD); default: video for digits-video")
    p.add_argument("--model", default=None, help="zoo name or from_pretrained folder (default: the family's zoo model)")
    p.add_argument("--n", type=int, default=850, help="held-out questions per type (850 x 3: 1 s.e. <= 0.01)")
    p.add_argument("--ratios", default="0.5,0.25,0.125,0.0625", help="keep ratios of layers 1..L-1")
    p.add_argument("--routers", nargs="*", default=[], metavar="RATIO=FOLDER",
                   help="trained p-MoD routers (MoDRouters.save) and the keep ratio they were trained for")
    p.add_argument("--eval-batch", type=int, default=50)
    p.add_argument("--batch", type=int, default=16, help="probe batch the FLOPs are counted on")
    p.add_argument("--seed", type=int, default=0, help="random dropping's seed")
    args = p.parse_args(argv)
    family = family_for(args.family, args.model)
    if args.model is None:
        args.model = family.smoke_model if args.smoke else family.default_model
    if args.smoke:
        args.n, args.batch, args.ratios = 4, 4, "0.5,0.25"
    harness.setup(args)
    t0 = time.perf_counter()
    model, tok = family.build_model(args.model)
    ratios = [float(r) for r in args.ratios.split(",")]
    routers = router_folders(args.routers)
    for r, _ in routers:
        if r not in ratios:
            ratios.append(r)
    data = family.questions(tok, args.n)
    probe = family.probe(data, args.batch)
    rows: list[dict[str, Any]] = []
    plain: dict[str, Any] = {}
    todo = setups(ratios, routers, family.method)
    for setup in tqdm(todo, desc="sweep"):
        row = run(model, tok, family, data, probe, setup, plain, args)
        if setup["kind"] == "plain":
            plain = {"flops": row["flops"], "preds": row["preds"]}  # counted by run(): not again
        rows.append(row)
        print(f"{setup['name']:>16} r={setup['ratio']:<7} acc {row['acc_all']:.3f} ± {row['acc_all_se']:.3f}  "
              f"FLOPs {row['flops_fraction']:.3f}", flush=True)
    summary = summarize(rows)
    for row in rows:
        row.pop("preds")
        row["right"] = sum(row["right"])  # the JSON keeps the count; the per-question list made the margins
    meta = {"model": args.model, "family": family.name, "method": family.method, "qtypes": list(family.qtypes),
            "vision_tokens": {family.unit: family.n_tokens}, "probe_batch": len(probe), "n_per_type": args.n, "questions": len(data.questions), "ratios": ratios,
            "routers": args.routers, "seed": args.seed, "machine": harness.machine(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M"), "seconds": round(time.perf_counter() - t0, 1)}
    res = {"meta": meta, "rows": rows, "summary": summary}
    md = report(rows, summary, meta)
    print("\n" + md)
    if args.smoke and not args.out:
        return res
    harness.write(args.out or harness.RESULTS / f"{family.results}.json", res, md,
                  lambda png: plot(rows, meta, png))
    return res


def router_folders(specs: list[str]) -> list[tuple[float, str]]:
    """``RATIO=FOLDER`` pairs: routers trained (``python -m mmskip.vision.pmod.train``) with the
    schedule that keeps ``RATIO`` of the vision tokens in layers 1..L-1."""
    out = []
    for spec in specs:
        ratio, sep, folder = spec.partition("=")
        try:
            out.append((float(ratio), folder))
        except ValueError:
            sep = ""
        if not sep or not folder:
            raise SystemExit(f"--routers takes RATIO=FOLDER (e.g. 0.25=runs/pmod-routers), got {spec!r}")
    return out


def report(rows: list[dict[str, Any]], summary: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    qtypes = meta["qtypes"]
    head = ["config", "keep ratio", "decoder prefill FLOPs", f"acc {' / '.join(qtypes)}", "acc all (± 1 s.e.)",
            "agree w/ unmodified"]
    body = [[r["name"], f"{r['ratio']:g}", f"{r['flops_fraction']:.3f}",
             " / ".join(f"{r[f'acc_{t}']:.3f}" for t in qtypes), f"{r['acc_all']:.3f} ± {r['acc_all_se']:.3f}",
             f"{r['agree_unmodified']:.3f}"] for r in rows]
    best = [[f"{s['ratio']:g}", s["best"], f"{s['best_acc']:.3f}", f"{s['random_acc']:.3f}",
             f"{s['margin']:+.3f} ± {s['margin_se']:.3f}"
             + (f" ({s['margin_in_se']:.1f} s.e.)" if s["margin_in_se"] is not None else "")] for s in summary]
    return (f"{meta['model']}: {meta['questions']} held-out questions ({meta['n_per_type']} per type), "
            "greedy one-token answers; FLOPs counted inside the decoder layers over one probe batch.\n\n"
            + harness.table(head, body, "llrrrr") + "\n\nBest config at each keep ratio, against random dropping "
            "(paired: the same questions):\n\n"
            + harness.table(["keep ratio", "best", "its accuracy", "random", "margin (paired s.e.)"], best, "llrrr"))


def plot(rows: list[dict[str, Any]], meta: dict[str, Any], png: Any) -> None:
    fig = harness.figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    plain = next(r for r in rows if r["kind"] == "plain")
    ax.axhline(plain["acc_all"], color="k", lw=1, ls="--", label="unmodified")
    for name in dict.fromkeys(r["name"] if r["kind"] != "pool" else "pool" for r in rows if r["kind"] != "plain"):
        pts = sorted((r for r in rows if (r["name"] if r["kind"] != "pool" else "pool") == name),
                     key=lambda r: r["flops_fraction"])
        ax.errorbar([r["flops_fraction"] for r in pts], [r["acc_all"] for r in pts],
                    yerr=[r["acc_all_se"] for r in pts], marker="o", capsize=3, label=name)
    ax.set_xlabel("decoder prefill FLOPs (fraction of unmodified)")
    ax.set_ylabel("held-out accuracy (± 1 s.e.)")
    ax.set_title(f"{meta['model']} ({meta['method']}): vision-token routers vs random dropping and pooling")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
