"""How ``stdlib-lm-skip``'s recipe was chosen: nine compute-matched variants trained at once on one
GPU (one process each), scored on held-out text.

    python benchmarks/skip_aware_sweep.py                # needs CUDA; about 5 min on an H200
    python benchmarks/skip_aware_sweep.py --smoke        # seconds on the CPU: 2 variants, 2 steps

Every variant spends the same weight multiply-adds as ``stdlib-lm``'s 800 steps
(``recipes/stdlib_lm_skip.py``'s ``matched_steps``: early exits cost a head each). Scored on up to 64
held-out 256-token windows: perplexity, how often an early exit at L/4, L/2, 3L/4 (the final norm
and the shared head on that layer) predicts the full model's argmax, and the same agreement under
``LayerSkipConfig(unified(s), phase="all")``. Writes ``results/skip_aware_sweep.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
import torch

VARIANTS = {  # name -> recipe overrides (RECIPE of recipes/stdlib_lm_skip.py)
    "16x128 LM only (stdlib-lm's recipe)": dict(layers=16, d=128, p_max=0.0, rotation=None),
    "24x64 LM only": dict(layers=24, d=64, p_max=0.0, rotation=None),
    "24x64 p0.1 e0.1 R8": dict(layers=24, d=64, p_max=0.1, e_scale=0.1, rotation=8),
    "24x64 p0.2 e0.3 R8": dict(layers=24, d=64, p_max=0.2, e_scale=0.3, rotation=8),
    "24x64 p0.2 e1.0 R8 (chosen)": dict(layers=24, d=64, p_max=0.2, e_scale=1.0, rotation=8),
    "24x64 p0.2 const e0.3 R8": dict(layers=24, d=64, p_max=0.2, e_scale=0.3, rotation=8,
                                     dropout_curriculum="constant"),
    "24x64 p0.1 e0.3 R4": dict(layers=24, d=64, p_max=0.1, e_scale=0.3, rotation=4),
    "16x128 p0.1 e0.3 R8": dict(layers=16, d=128, p_max=0.1, e_scale=0.3, rotation=8),
    "20x80 p0.2 e0.3 R8": dict(layers=20, d=80, p_max=0.2, e_scale=0.3, rotation=8),
}


@torch.no_grad()
def score(folder: Path, device: str, windows: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mmskip
    from mmskip.eval.lm import heldout_ids
    from mmskip.registry import get_adapter

    model = AutoModelForCausalLM.from_pretrained(folder).float().to(device).eval()
    ids = heldout_ids(AutoTokenizer.from_pretrained(folder))
    n = min(windows, len(ids) // 256)
    x = ids[: n * 256].view(n, 256).to(device)
    adapter = get_adapter(model)
    L, hidden = adapter.num_layers, {}
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: hidden.__setitem__(i, o))
             for i, layer in enumerate(adapter.layers)]
    logits = model(input_ids=x).logits
    for h in hooks:
        h.remove()
    ref = logits.argmax(-1)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    res = {"perplexity": float(nll.exp())}
    for k in sorted({max(1, L // 4), L // 2, 3 * L // 4}):
        exit_logits = adapter.head(adapter.final_norm(hidden[k - 1]))
        res[f"exit {k}/{L}"] = float((exit_logits.argmax(-1) == ref).float().mean())
    for s in (1.5, 2.0, 3.0):
        with mmskip.applied(model, mmskip.LayerSkipConfig(schedule=mmskip.schedules.unified(s), phase="all")):
            res[f"unified {s}"] = float((model(input_ids=x).logits.argmax(-1) == ref).float().mean())
    return res


def one(name: str, work: Path, device: str, steps: int | None, windows: int) -> None:
    from mmskip.cli import recipe

    train_stdlib_lm_skip = recipe("stdlib_lm_skip").train_stdlib_lm_skip

    torch.set_num_threads(1)
    folder = work / name.replace(" ", "_")
    texts = None
    if steps is not None:  # smoke: a few files
        from mmskip.zoo.stdlib_data import read_texts

        texts = (read_texts("train")[:4], read_texts("test")[:1])
    t0 = time.time()
    metrics = train_stdlib_lm_skip(folder, steps=steps, device=device, texts=texts, write_card=False,
                                   **VARIANTS[name])
    row = {"steps": metrics["steps"], "parameters": metrics["parameters"], "train_s": time.time() - t0,
           **score(folder, device, windows)}
    (folder / "sweep.json").write_text(json.dumps(row))


def render(rows: dict[str, dict], meta: dict) -> str:
    lines = [f"{meta['device']}, {meta['date']}: every variant compute-matched to stdlib-lm's 800 steps; scored on "
             f"{meta['windows']} held-out windows of 256 tokens", "",
             "| variant | steps | params | perplexity | early exit L/4, L/2, 3L/4 agreement | unified 1.5 / 2 / 3 agreement |",
             "|---|---:|---:|---:|---|---|"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | failed | | | | |")
            continue
        exits = " / ".join(f"{v:.2f}" for k, v in r.items() if k.startswith("exit"))
        uni = " / ".join(f"{r[f'unified {s}']:.2f}" for s in (1.5, 2.0, 3.0))
        lines.append(f"| {name} | {r['steps']} | {r['parameters'] / 1e6:.2f}M | {r['perplexity']:.1f} | {exits} | {uni} |")
    text = "\n".join(lines)
    print("\n" + text)
    return text


def main(argv: list[str] | None = None) -> dict:
    p = harness.arguments(__doc__, repeats=None, threads=None, smoke="seconds on the CPU: 2 variants, 2 steps")
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # worker process
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    steps = 2 if args.smoke else None
    if args.one:
        one(args.one, Path(args.work), device, steps, args.windows)
        return {}
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("the sweep trains nine models at once: run it on a GPU (or --smoke on the CPU)")
    names = list(VARIANTS)[:2] if args.smoke else list(VARIANTS)
    work = Path(tempfile.mkdtemp(prefix="mmskip-sweep-"))
    base = [sys.executable, __file__, "--work", str(work), "--windows", str(args.windows)] + (["--smoke"] if args.smoke else [])
    procs = [subprocess.Popen([*base, "--one", n], stdout=open(work / f"{i}.log", "w"), stderr=subprocess.STDOUT)
             for i, n in enumerate(names)]
    for proc in procs:
        proc.wait()
    rows = {}
    for i, n in enumerate(names):
        f = work / n.replace(" ", "_") / "sweep.json"
        rows[n] = json.loads(f.read_text()) if f.exists() else {"error": (work / f"{i}.log").read_text()[-2000:]}
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "windows": args.windows,
            "smoke": args.smoke, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    text = render(rows, meta)
    harness.write(args.out or harness.RESULTS / "skip_aware_sweep.json", {"meta": meta, "rows": rows}, text)
    return {"meta": meta, "rows": rows}


if __name__ == "__main__":
    main()
