"""Memory soak: apply/remove cycles and Skip-pipeline calls keep the process's RSS flat.

Runs ``--cycles`` apply -> generate -> remove cycles of every LLM technique on a tiny Llama and
``--calls`` calls of a tiny ``SkipStableDiffusionPipeline`` with feature inheritance, reading the
resident set size (``/proc/self/statm``) after a warm-up and then every tenth of the run. A leak
shows as RSS that keeps growing; the allocator's noise as a few MB up and down. Prints a table of
first / last / maximum RSS and the growth per 100 iterations, and writes
``benchmarks/results/memory_soak.json``.

    python benchmarks/memory_soak.py [--cycles 1000] [--calls 500]
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable

import harness
import torch
from tqdm import tqdm


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def soak(name: str, step: Callable[[], None], n: int, warmup: int) -> dict:
    """Run ``step`` ``warmup + n`` times; RSS after the warm-up and at every tenth of the run."""
    for _ in range(warmup):
        step()
    gc.collect()
    readings = [rss_mb()]
    every = max(1, n // 10)
    for i in tqdm(range(n), desc=name, leave=False):
        step()
        if (i + 1) % every == 0:
            gc.collect()
            readings.append(rss_mb())
    growth = (readings[-1] - readings[0]) / n * 100
    return {"name": name, "iterations": n, "rss_mb": readings, "first": readings[0], "last": readings[-1],
            "max": max(readings), "growth_mb_per_100": growth}


def llm_steps() -> dict[str, Callable[[], None]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    import mmskip
    from mmskip import schedules

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, 128, (1, 8))
    configs = {
        "layer_skip": mmskip.LayerSkipConfig(schedule=schedules.unified(2.0)),
        "ffn_skip": mmskip.FFNSkipConfig(),
        "void_layers": mmskip.VoidLayerConfig(),
        "self_speculative": mmskip.SelfSpeculativeConfig(search_trials=4, random_trials=2),
    }

    def cycle(config) -> Callable[[], None]:
        def step() -> None:
            with torch.no_grad(), mmskip.applied(model, config):
                model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        return step

    return {f"apply/generate/remove {k}": cycle(c) for k, c in configs.items()}


def pipeline_step() -> Callable[[], None]:
    from _test_denoisers import tiny_pipeline_components
    from mmskip.diffusion import FeatureInheritanceConfig
    from mmskip.pipelines import SkipStableDiffusionPipeline

    from mmskip.schedules import interval

    components, kwargs = tiny_pipeline_components("sd")
    pipe = SkipStableDiffusionPipeline(**components)
    pipe.enable_skip(FeatureInheritanceConfig(interval(2)))
    pipe.set_progress_bar_config(disable=True)

    def step() -> None:
        pipe(**kwargs, generator=torch.Generator().manual_seed(0))

    return step


def main(argv: list[str] | None = None) -> dict:
    ap = harness.arguments(__doc__, repeats=None, threads=1, smoke="20 cycles and 10 calls, warm-up 2: checks the script runs")
    ap.add_argument("--cycles", type=int, default=1000, help="apply/generate/remove cycles per LLM technique")
    ap.add_argument("--calls", type=int, default=500, help="Skip-pipeline calls")
    ap.add_argument("--warmup", type=int, default=20, help="iterations run before the first reading")
    args = ap.parse_args(argv)
    if args.smoke:
        args.cycles, args.calls, args.warmup = 20, 10, 2
    harness.setup(args)
    rows = [soak(name, step, args.cycles, args.warmup) for name, step in llm_steps().items()]
    rows.append(soak("SkipStableDiffusionPipeline call (inheritance every 2)", pipeline_step(), args.calls,
                     args.warmup))
    text = harness.table(["run", "iterations", "RSS first (MiB)", "last", "max", "growth per 100 (MiB)"],
                         [[r["name"], r["iterations"], f"{r['first']:.1f}", f"{r['last']:.1f}", f"{r['max']:.1f}",
                           f"{r['growth_mb_per_100']:+.2f}"] for r in rows], align="lrrrrr")
    print("\n" + text)
    result = {"meta": vars(args), "rows": rows}
    harness.write(args.out or harness.RESULTS / f"memory_soak{'_smoke' if args.smoke else ''}.json", result, text)
    return result


if __name__ == "__main__":
    main()
