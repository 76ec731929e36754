"""Does skip-aware training pay? ``stdlib-lm`` (trained without skipping), ``stdlib-lm-skip``
(LayerSkip recipe) and a schedule-aware fine-tune of each, under every LLM technique, CPU, batch 1.

    python benchmarks/skip_aware.py              # the four models (about 20 min on 2 cores)
    python benchmarks/skip_aware.py --smoke      # seconds: tiny random models (CI check)

Per model:

- **perplexity**: the full model on the zoo card's held-out set (200 windows of 256 tokens).
- **lossy techniques** (unified layer skipping s = 1.5 / 2 / 3 in its default decode phase,
  FFN-SkipLLM, void layers): kept fraction of the decode steps' FLOPs (``handle.stats()``, prompt
  prefill subtracted), teacher-forced agreement
  *while decoding* (``mmskip.eval.decode_agreement``: each step's greedy token vs the full model's,
  the reference context forced) and free-running exact / prefix match of ``--new-tokens``
  greedy tokens on ``--prompts`` held-out prompts; for layer skipping also the perplexity of the
  skipped model itself (the schedule applied to every token, ``phase="all"``).
- **lossless speculative decoding** (SWIFT, transformers' ``assistant_early_exit`` at L/4, L/2,
  3L/4): tokens/s against plain ``generate`` in the same run, acceptance rate, identical outputs
  (``benchmarks/llm_speculative.py``'s runner; ``--speed-prompts`` x ``--speed-tokens``).

A schedule-aware fine-tune is its base model with a LoRA adapter merged in (the Unified paper's
fine-tune: 300 steps with ``unified(1.5)`` applied; :data:`FINE_TUNES` holds each adapter's folder
under ``benchmarks/results`` and its ``python -m mmskip.train`` arguments; an adapter is re-trained
there if missing). ``stdlib-lm-skip``'s keeps its layer dropout and early-exit loss on. Writes ``results/skip_aware.json`` / ``.md`` / ``.png``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import harness
import llm_speculative as spec  # the SWIFT / early-exit runner and prompts
import torch

import mmskip
from mmskip import schedules
from mmskip.eval.decode_agreement import decode_agreement
from mmskip.eval.language import agreement, greedy_generate, perplexity
from mmskip.registry import get_adapter

_LORA_ARGS = ["--speedup", "1.5", "--lora", "--steps", "300", "--batch", "8", "--threads", "1"]
# name -> (base zoo model, adapter folder, ``mmskip.train`` arguments that trained it)
FINE_TUNES: dict[str, tuple[str, Path, list[str]]] = {
    "stdlib-lm + unified-1.5 FT": ("stdlib-lm", harness.RESULTS / "skip_aware_unified1.5_lora",
                                   ["--model", "stdlib-lm", "--objective", "schedule-aware", "lm", *_LORA_ARGS]),
    "stdlib-lm-skip + unified-1.5 FT": (
        "stdlib-lm-skip", harness.RESULTS / "skip_aware_skip_unified1.5_lora",
        ["--model", "stdlib-lm-skip", "--objective", "schedule-aware", "early-exit", "layer-dropout", "--rotation", "8",
         "--dropout-curriculum", "exponential", "--p-max", "0.2", "--e-scale", "1.0", *_LORA_ARGS]),
}
MODELS = {"stdlib-lm": "trained without skipping", "stdlib-lm + unified-1.5 FT": "schedule-aware LoRA fine-tune",
          "stdlib-lm-skip": "layer dropout + early-exit loss",
          "stdlib-lm-skip + unified-1.5 FT": "schedule-aware LoRA fine-tune, LayerSkip objectives kept"}


def load(name: str, smoke: bool) -> tuple[torch.nn.Module, Any]:
    if smoke:
        base = FINE_TUNES[name][0] if name in FINE_TUNES else name
        model, _ = spec.build({"stdlib-lm": "random-4x64", "stdlib-lm-skip": "random-6x64"}.get(base, "random-4x64"))
        return model, None
    from mmskip.eval.lm import load_lm

    if name not in FINE_TUNES:
        return load_lm(name)
    base, folder, args = FINE_TUNES[name]
    model, tok = load_lm(base)
    if not (folder / "adapter_model.safetensors").exists():
        _train_adapter(folder, args)
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(folder)).merge_and_unload().float().eval(), tok


def _train_adapter(folder: Path, args: list[str]) -> None:
    """Re-create a committed adapter (minutes on one thread), stored in fp16."""
    import tempfile

    from safetensors.torch import load_file, save_file

    from mmskip.train.__main__ import main as train_main

    tmp = Path(tempfile.mkdtemp(prefix="mmskip-ft-"))
    train_main([*args, "--out", str(tmp)])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text((tmp / "lora" / "adapter_config.json").read_text())
    state = load_file(str(tmp / "lora" / "adapter_model.safetensors"))
    save_file({k: v.half() for k, v in state.items()}, str(folder / "adapter_model.safetensors"))
    (folder / "train_info.json").write_text((tmp / "train_info.json").read_text())


def prompts_for(tok: Any, vocab: int, n: int, length: int) -> list[torch.Tensor]:
    return [p[0] for p in spec.held_out_prompts(tok, n, length, vocab)]


def lossy_configs(smoke: bool) -> dict[str, Any]:
    speeds = (1.5,) if smoke else (1.5, 2.0, 3.0)
    configs = {f"unified s={s}": mmskip.LayerSkipConfig(schedule=schedules.unified(s)) for s in speeds}
    configs["FFN-SkipLLM"] = mmskip.FFNSkipConfig()
    configs["void layers"] = mmskip.VoidLayerConfig()
    return configs


def lossy_rows(model: torch.nn.Module, prompts: list[torch.Tensor], new_tokens: int, smoke: bool,
               ppl_ids: torch.Tensor, ppl_args: tuple[int, int]) -> list[dict]:
    base = greedy_generate(model, prompts, new_tokens)
    rows = []
    for name, config in lossy_configs(smoke).items():
        with mmskip.applied(model, config) as handle:
            cand = greedy_generate(model, prompts, new_tokens)
            free = agreement(model, prompts, base, cand)
            handle.reset_stats()
            tf = sum(decode_agreement(model, p[None], torch.ones_like(p[None]), b[None]) * len(b)
                     for p, b in zip(prompts, base)) / sum(len(b) for b in base)
            spent, full = handle.stats()["flops"].values()
            handle.reset_stats()  # subtract the prompts' prefill: the kept fraction of decode FLOPs
            with torch.no_grad():
                for p in prompts:
                    model(input_ids=p[None], logits_to_keep=1)  # as generate runs its prefill
            pre_spent, pre_full = handle.stats()["flops"].values()
            kept = (spent - pre_spent) / (full - pre_full)
        row = {"config": name, "kept_flops": kept, "teacher_forced": tf, "exact_match": free["exact_match"],
               "prefix_match": free["prefix_match"]}
        if isinstance(config, mmskip.LayerSkipConfig):  # the skipped model's own quality: every token skips
            with mmskip.applied(model, dataclasses.replace(config, phase="all")):
                row["skipped_perplexity"] = perplexity(model, ppl_ids, *ppl_args)
        rows.append(row)
    return rows


def speed_rows(model: torch.nn.Module, prompts: list[torch.Tensor], new_tokens: int, smoke: bool) -> list[dict]:
    from mmskip.swift import SelfSpeculativeConfig

    L = get_adapter(model).num_layers
    configs: dict[str, tuple[str, Any]] = {"plain": ("plain", None)}
    for r in (0.3,) if smoke else (0.2, 0.45):
        configs[f"SWIFT r={r}"] = ("apply", SelfSpeculativeConfig(skip_ratio=r))
    for k in sorted({max(1, L // 4), L // 2, 3 * L // 4}):
        configs[f"early exit k={k}"] = ("early_exit", k)
    batch = [p[None] for p in prompts]
    for kind, arg in configs.values():  # warm-up
        spec.run(model, batch[:1], 4, kind, arg)
    res = {name: spec.run(model, batch, new_tokens, kind, arg) for name, (kind, arg) in configs.items()}
    plain = res["plain"]
    rows = []
    for name, r in res.items():
        same = sum(torch.equal(a, b) for a, b in zip(r["tokens"], plain["tokens"]))
        rows.append({"config": name, "ratio_vs_plain": plain["seconds"] / r["seconds"],
                     "tokens_per_s": sum(map(len, r["tokens"])) / r["seconds"],
                     "acceptance_rate": r.get("acceptance_rate"), "identical": f"{same}/{len(prompts)}"})
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = harness.arguments(__doc__, repeats=None, smoke="tiny random models, few tokens: checks the script runs")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--speed-prompts", type=int, default=8)
    p.add_argument("--speed-tokens", type=int, default=128)
    p.add_argument("--merge", action="store_true",
                   help="keep the other models' entries of the existing results (rerun one retrained model)")
    args = p.parse_args(argv)
    if args.smoke:
        args.prompts, args.new_tokens, args.speed_prompts, args.speed_tokens = 2, 6, 2, 8
        args.models = ["stdlib-lm", "stdlib-lm-skip"] if args.models == list(MODELS) else args.models
    harness.setup(args)
    results = []
    for name in args.models:
        t0 = time.time()
        model, tok = load(name, args.smoke)
        L, vocab = get_adapter(model).num_layers, model.config.vocab_size
        if tok is not None:
            from mmskip.eval.lm import heldout_ids

            ppl_ids, ppl_args = heldout_ids(tok), (256, 200)
        else:
            ppl_ids, ppl_args = torch.randint(3, vocab, (600,), generator=torch.Generator().manual_seed(0)), (64, 4)
        ppl = perplexity(model, ppl_ids, *ppl_args)
        prompts = prompts_for(tok, vocab, args.prompts, 64 if tok is not None else 12)
        entry = {"model": name, "about": MODELS[name], "layers": L,
                 "parameters": sum(q.numel() for q in model.parameters()), "perplexity": ppl,
                 "lossy": lossy_rows(model, prompts, args.new_tokens, args.smoke, ppl_ids, ppl_args),
                 "speed": speed_rows(model, prompts[: args.speed_prompts], args.speed_tokens, args.smoke)}
        entry["seconds"] = time.time() - t0
        results.append(entry)
        print(f"{name}: done in {entry['seconds']:.0f}s", flush=True)
    meta = {"threads": args.threads, "prompts": args.prompts, "new_tokens": args.new_tokens,
            "speed_prompts": args.speed_prompts, "speed_tokens": args.speed_tokens, "smoke": args.smoke,
            "torch": torch.__version__, "machine": harness.machine(),
            "date": time.strftime("%Y-%m-%d %H:%M")}
    out = args.out or harness.RESULTS / "skip_aware.json"
    if args.merge:
        results = _merged(out, results, meta)
    text = render(results, meta)
    harness.write(out, {"meta": meta, "models": results}, text, lambda png: plot(results, png))
    return {"meta": meta, "models": results}


def _merged(out: Path, results: list[dict], meta: dict) -> list[dict]:
    """This run's entries with the other models' from ``out`` (same settings required), in MODELS' order;
    each entry keeps the date of the run that measured it."""
    import json

    old = json.loads(Path(out).read_text()) if Path(out).exists() else {"meta": meta, "models": []}
    keys = ("threads", "prompts", "new_tokens", "speed_prompts", "speed_tokens", "smoke")
    if any(old["meta"].get(k) != meta[k] for k in keys):
        raise SystemExit(f"--merge: {out} was measured with other settings ({ {k: old['meta'].get(k) for k in keys} })")
    for m in old["models"]:
        m.setdefault("date", old["meta"]["date"])
    for m in results:
        m["date"] = meta["date"]
    new = {m["model"]: m for m in results}
    merged = [new.get(m["model"], m) for m in old["models"]] + [m for m in results if m["model"] not in
                                                                 {o["model"] for o in old["models"]}]
    meta["date"] = ", ".join(f"{m['model']} {m['date']}" for m in merged)
    return merged


def render(results: list[dict], meta: dict) -> str:
    lines = [f"{meta['prompts']} held-out prompts x {meta['new_tokens']} greedy tokens (lossy rows); "
             f"{meta['speed_prompts']} x {meta['speed_tokens']} (speed rows); batch 1, CPU, "
             f"torch.set_num_threads({meta['threads']}); one run{' per model' if ',' in meta['date'] else ''}, {meta['date']}", "",
             "| model | full-model perplexity | config | kept FLOPs | teacher-forced agreement | exact / prefix match "
             "| perplexity, every token skipping | speed vs plain | acceptance | identical outputs |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in results:
        head = f"| {m['model']} ({m['layers']} layers, {m['parameters'] / 1e6:.2f}M) | {m['perplexity']:.1f} "
        for r in m["lossy"]:
            sp = f"{r['skipped_perplexity']:.1f}" if "skipped_perplexity" in r else "-"
            lines.append(f"{head}| {r['config']} | {r['kept_flops']:.2f} | {r['teacher_forced']:.3f} | "
                         f"{r['exact_match']:.2f} / {r['prefix_match']:.2f} | {sp} | - | - | - |")
            head = "| | "
        for r in m["speed"]:
            acc = f"{r['acceptance_rate']:.2f}" if r["acceptance_rate"] is not None else "-"
            lines.append(f"{head}| {r['config']} | - | - | - | - | {r['ratio_vs_plain']:.2f}x | {acc} | {r['identical']} |")
    text = "\n".join(lines)
    print("\n" + text)
    return text


def plot(results: list[dict], path: Path) -> None:
    """Teacher-forced agreement vs kept-FLOPs fraction, one line per model (and early-exit acceptance vs k/L)."""
    try:
        fig = harness.figure(figsize=(7, 4.5))
    except ModuleNotFoundError:
        print("matplotlib missing (pip install 'mmskip[analysis]'): no plot")
        return
    ax = fig.add_subplot()
    for i, m in enumerate(results):
        color = f"C{i}"
        pts = sorted((r["kept_flops"], r["teacher_forced"], r["config"]) for r in m["lossy"])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=f"{m['model']}: skipping")
        for x, y, name in pts:
            ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points", color=color)
        ee = [(int(r["config"].split("=")[1]) / m["layers"], r["acceptance_rate"]) for r in m["speed"]
              if r["config"].startswith("early exit")]
        ax.plot([e[0] for e in ee], [e[1] for e in ee], "s--", color=color, alpha=0.6,
                label=f"{m['model']}: early-exit draft acceptance (x = k/L)")
    ax.set_xlabel("kept fraction of decode FLOPs (early exit: k / L)")
    ax.set_ylabel("agreement with the full model")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Skip-aware training: agreement vs compute kept")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
