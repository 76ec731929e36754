"""Which vision-token router is best, where, and by how much: a keep-ratio sweep on ``digits-llava``.

    python benchmarks/vision_tokens_sweep.py                      # zoo digits-llava, 850 questions per type
    python benchmarks/vision_tokens_sweep.py --model runs/zoo/x   # any from_pretrained folder
    python benchmarks/vision_tokens_sweep.py --routers 0.25=runs/r  # add routers trained for keep 0.25
    python benchmarks/vision_tokens_sweep.py --smoke              # seconds: tiny random LLaVA

At every keep ratio ``r`` (vision tokens kept in decoder layers 1..L-1; layer 0 keeps all, as
p-MoD's schedules do) the same held-out questions are answered by:

* **p-MoD** (``MoDConfig`` with ``schedules.explicit``) ranking by each training-free signal
  (``attention``: the last prompt token's attention, FastV's signal; ``norm``: the feature norm);
* **random**: the same per-layer counts, one seeded random score per token (a dropped token stays
  dropped), i.e. what any router must beat;
* **pool**: the projector's 8x8 grid average-pooled to ``r`` of its tokens (1x2, 2x2, 2x4, 4x4: 1/2
  to 1/16) in every layer, layer 0 included, with as many ``<image>`` tokens in the prompt;
* trained routers given with ``--routers RATIO=FOLDER`` (``MoDConfig(signal="router")``, at the
  ratio they were trained for; routers trained with a LoRA are used without it).

Reported per config: accuracy per question type and overall with its standard error, agreement
with the unmodified model's answer, and the decoder's prefill FLOPs fraction (counted with
``torch.utils.flop_counter`` inside the decoder layers over one probe batch). For each ratio the
table names the best config and its margin over random dropping in units of the paired standard
error (the configs answer the same questions, so the difference's error is what counts). Accuracy
only: prefill time is measured by ``benchmarks/vision_tokens.py``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import harness
import torch
import torch.nn.functional as F
from _token_meters import layer_flops
from _token_peers import random_ranking
from mmskip.vision import MoDConfig
from tqdm.auto import tqdm
from vision_tokens import SMOKE_MODEL, build_model, inputs, questions
from vision_tokens import accuracy as answer_accuracy

import mmskip
from mmskip import schedules
from mmskip.registry import get_adapter
from mmskip.zoo import llava_data as D

POOLS = {0.5: (1, 2), 0.25: (2, 2), 0.125: (2, 4), 0.0625: (4, 4)}  # keep ratio -> pooling window
SIGNALS = ("attention", "norm")


def pool_hook(window: tuple[int, int]):
    """A projector forward hook averaging its square grid of image features over ``window``."""
    def hook(module, args, out: torch.Tensor) -> torch.Tensor:
        B, n, d = out.shape
        s = math.isqrt(n)
        grid = out.transpose(1, 2).reshape(B, d, s, s)
        return F.avg_pool2d(grid, window).flatten(2).transpose(1, 2)
    return hook


class Applied:
    """One sweep config on the model; :meth:`remove` restores the model."""

    def __init__(self, model, kind: str, ratio: float, signal: str = "", routers: str | None = None,
                 seed: int = 0) -> None:
        self.handle, self.torch_hook, self.n_image = None, None, D.N_IMAGE_TOKENS
        adapter = get_adapter(model, "vlm")
        if kind == "pool":
            kh, kw = POOLS[ratio]
            self.n_image = D.N_IMAGE_TOKENS // (kh * kw)
            self.torch_hook = adapter.mm_model.multi_modal_projector.register_forward_hook(pool_hook((kh, kw)))
        elif kind != "plain":
            ratios = [1.0] + [ratio] * (adapter.num_layers - 1)
            cfg = MoDConfig(schedule=schedules.explicit(ratios=ratios), signal="router" if routers else signal,
                            routers=routers)
            self.handle = mmskip.apply(model, cfg)
            if kind == "random":
                layers = adapter.text.layers
                random_ranking({i: layers[i]._diffusers_hook.get_hook(self.handle.hook_name + ".layer")
                                for i in self.handle.state.ratios}, seed)

    def remove(self) -> None:
        if self.torch_hook is not None:
            self.torch_hook.remove()
        if self.handle is not None:
            self.handle.remove()


def setups(ratios: list[float], routers: dict[float, str]) -> list[dict[str, Any]]:
    out = [{"name": "unmodified", "kind": "plain", "ratio": 1.0}]
    for r in ratios:
        out += [{"name": f"p-MoD {s}", "kind": "mod", "ratio": r, "signal": s} for s in SIGNALS]
        if r in routers:
            out.append({"name": "p-MoD router", "kind": "mod", "ratio": r, "routers": routers[r]})
        out.append({"name": "random", "kind": "random", "ratio": r, "signal": "attention"})  # ranking replaced
        if r in POOLS:
            kh, kw = POOLS[r]
            out.append({"name": f"pool {kh}x{kw}", "kind": "pool", "ratio": r})
    return out


def run(model, tok, data: D.Batch, probe: list[int], setup: dict[str, Any], plain: dict[str, Any],
        args: Any) -> dict[str, Any]:
    att = Applied(model, setup["kind"], setup["ratio"], setup.get("signal", ""), setup.get("routers"), args.seed)
    try:
        flops = layer_flops(model, inputs(tok, data, probe, att.n_image))[0]
        acc, preds = answer_accuracy(model, tok, data, att.n_image, args.eval_batch)
    finally:
        att.remove()
    vocab = tok.get_vocab()
    right = [p == vocab[a] for p, a in zip(preds, data.answers, strict=True)]
    row = {**setup, "flops_fraction": flops / plain["flops"] if plain else 1.0, "right": right,
           **{f"acc_{k}": v for k, v in acc.items()},
           "acc_all_se": math.sqrt(acc["all"] * (1 - acc["all"]) / len(preds)),
           "agree_unmodified": sum(a == b for a, b in zip(preds, plain["preds"], strict=True)) / len(preds)
           if plain else 1.0}
    row["preds"] = preds
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
                          smoke=f"seconds: {SMOKE_MODEL}, 4 questions per type, two ratios")
    p.add_argument("--model", default="digits-llava", help="zoo name or from_pretrained folder")
    p.add_argument("--n", type=int, default=850, help="held-out questions per type (850 x 3: 1 s.e. <= 0.01)")
    p.add_argument("--ratios", default="0.5,0.25,0.125,0.0625", help="keep ratios of layers 1..L-1")
    p.add_argument("--routers", nargs="*", default=[], metavar="RATIO=FOLDER",
                   help="trained p-MoD routers (MoDRouters.save) and the keep ratio they were trained for")
    p.add_argument("--eval-batch", type=int, default=50)
    p.add_argument("--batch", type=int, default=16, help="probe batch the FLOPs are counted on")
    p.add_argument("--seed", type=int, default=0, help="random dropping's seed")
    args = p.parse_args(argv)
    if args.smoke:
        args.model = args.model if args.model != "digits-llava" else SMOKE_MODEL
        args.n, args.batch, args.ratios = 4, 4, "0.5,0.25"
    harness.setup(args)
    t0 = time.perf_counter()
    model, tok = build_model(args.model)
    ratios = [float(r) for r in args.ratios.split(",")]
    routers = router_folders(args.routers)
    for r in routers:
        if r not in ratios:
            ratios.append(r)
    data = questions(tok, args.n)
    probe = list(range(0, len(data.questions), max(1, len(data.questions) // args.batch)))[: args.batch]
    rows: list[dict[str, Any]] = []
    plain: dict[str, Any] = {}
    todo = setups(ratios, routers)
    for setup in tqdm(todo, desc="sweep"):
        row = run(model, tok, data, probe, setup, plain, args)
        if setup["kind"] == "plain":
            plain = {"flops": layer_flops(model, inputs(tok, data, probe, D.N_IMAGE_TOKENS))[0], "preds": row["preds"]}
        rows.append(row)
        print(f"{setup['name']:>16} r={setup['ratio']:<7} acc {row['acc_all']:.3f} ± {row['acc_all_se']:.3f}  "
              f"FLOPs {row['flops_fraction']:.3f}", flush=True)
    summary = summarize(rows)
    for row in rows:
        row.pop("preds")
        row["right"] = sum(row["right"])  # the JSON keeps the count; the per-question list made the margins
    meta = {"model": args.model, "n_per_type": args.n, "questions": len(data.questions), "ratios": ratios,
            "routers": args.routers, "seed": args.seed, "machine": harness.machine(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M"), "seconds": round(time.perf_counter() - t0, 1)}
    res = {"meta": meta, "rows": rows, "summary": summary}
    md = report(rows, summary, meta)
    print("\n" + md)
    if args.smoke and not args.out:
        return res
    harness.write(args.out or harness.RESULTS / "vision_tokens_sweep.json", res, md,
                  lambda png: plot(rows, meta, png))
    return res


def router_folders(specs: list[str]) -> dict[float, str]:
    """``RATIO=FOLDER`` pairs: routers trained (``python -m mmskip.vision.pmod.train``) with the
    schedule that keeps ``RATIO`` of the vision tokens in layers 1..L-1."""
    out = {}
    for spec in specs:
        ratio, sep, folder = spec.partition("=")
        try:
            out[float(ratio)] = folder
        except ValueError:
            sep = ""
        if not sep or not folder:
            raise SystemExit(f"--routers takes RATIO=FOLDER (e.g. 0.25=runs/pmod-routers), got {spec!r}")
    return out


def report(rows: list[dict[str, Any]], summary: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    head = ["config", "keep ratio", "decoder prefill FLOPs", "acc digit / count / sum", "acc all (± 1 s.e.)",
            "agree w/ unmodified"]
    body = [[r["name"], f"{r['ratio']:g}", f"{r['flops_fraction']:.3f}",
             " / ".join(f"{r[f'acc_{t}']:.3f}" for t in D.QTYPES), f"{r['acc_all']:.3f} ± {r['acc_all_se']:.3f}",
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
    ax.set_title(f"{meta['model']}: vision-token routers vs random dropping and pooling")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
