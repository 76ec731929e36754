"""Language part of the demo (``bash run.sh demo`` runs ``apps/demo.py``): each LLM technique on
the zoo's ``stdlib-lm``, speed beside quality.

Runs in a couple of minutes on a laptop CPU. Speed figures are ratios measured in this run
against the unmodified model (best of two round-robin runs after a warm-up; the scripts in
``benchmarks/`` repeat more and take medians).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

import mmskip
from mmskip import schedules
from mmskip.eval.decode_agreement import decode_agreement
from mmskip.eval.lm import load_lm

_PROMPTS = [
    "import os\n\n\ndef read_lines(path):\n",
    "class Stack:\n    def __init__(self):\n",
    "def parse_args(argv=None):\n    parser = ",
    "    for key, value in sorted(",
]


def _lm_configs() -> dict[str, mmskip.SkipConfig | None]:
    return {
        "full model": None,
        "Unified Layer Skipping s=1.5": mmskip.LayerSkipConfig(schedule=schedules.unified(1.5)),
        "Unified Layer Skipping s=2": mmskip.LayerSkipConfig(schedule=schedules.unified(2.0)),
        "FFN-SkipLLM (<=25% of FFNs)": mmskip.FFNSkipConfig(),
        "void layers (LAC, alpha=0.5)": mmskip.VoidLayerConfig(),
    }


@torch.no_grad()
def _timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


@torch.no_grad()
def language_demo(model_name: str = "stdlib-lm", new_tokens: int = 48, repeats: int = 2) -> list[dict]:
    """Greedy completions of Python prompts under each LLM technique."""
    model, tok = load_lm(model_name)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok(_PROMPTS, return_tensors="pt", padding=True)

    def gen() -> torch.Tensor:
        return model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=tok.pad_token_id)

    gen()  # warm-up
    configs = _lm_configs()
    seconds = {name: [] for name in configs}
    results: dict[str, tuple] = {}
    for _ in range(repeats):  # round-robin, best of `repeats`, to keep other load out of the ratios
        for name, cfg in configs.items():
            handle = mmskip.apply(model, cfg) if cfg else None
            try:
                out, t = _timed(gen)
                stats = handle.stats() if handle else {"flops_fraction": 1.0}
            finally:
                if handle:
                    handle.remove()
            seconds[name].append(t)
            results[name] = (out[:, batch["input_ids"].shape[1]:], stats)
    base_tokens = results["full model"][0]
    base_time = min(seconds["full model"])
    rows = []
    for name, (new, stats) in results.items():
        cfg = configs[name]
        handle = mmskip.apply(model, cfg) if cfg else None
        try:
            forced = decode_agreement(model, batch["input_ids"], batch["attention_mask"], base_tokens, tok.pad_token_id)
        finally:
            if handle:
                handle.remove()
        rows.append({
            "config": name, "speedup": base_time / min(seconds[name]), "flops_bound": 1 / stats["flops_fraction"],
            "agreement": forced, "free_running": float((new == base_tokens).float().mean()),
            "skipped_layers": stats.get("skipped_layers"), "sample": tok.decode(new[0], skip_special_tokens=True),
        })
    base_text = rows[0]["sample"]
    print(f"\n== Language: {model_name}, {len(_PROMPTS)} prompts x {new_tokens} greedy tokens, CPU ==")
    print("agreement with the full model's greedy tokens: teacher-forced while decoding / free-running")
    print(f"{'config':32s} {'speedup':>8s} {'bound':>7s} {'forced':>7s} {'free':>6s}  skipped layers")
    for r in rows:
        print(f"{r['config']:32s} {r['speedup']:7.2f}x {r['flops_bound']:6.2f}x {r['agreement']:7.2f} "
              f"{r['free_running']:6.2f}  {r['skipped_layers'] or ''}")
    print(f"\nprompt:\n{_PROMPTS[0]}full model continues:\n{base_text}\n")
    print(f"Unified s=1.5 continues:\n{rows[1]['sample']}")
    return rows
