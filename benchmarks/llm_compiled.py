"""Compiled decoding with layer skipping: static cache + ``torch.compile(fullgraph=True)`` vs compiled plain decoding.

    python benchmarks/llm_compiled.py                        # 24-layer d=512 Llama, random weights
    python benchmarks/llm_compiled.py --model stdlib-lm      # the zoo's trained LM, held-out prompts
    python benchmarks/llm_compiled.py --smoke                # seconds: tiny model, dynamo only

The fastest way users run a decoder on a GPU is transformers' compiled decoding: a static KV
cache and the decoding step compiled as one graph (``CompileConfig(fullgraph=True)``, CUDA graphs
with ``mode="reduce-overhead"``), the prompt eager. Each config is timed eager (dynamic cache) and
compiled (static cache) in one process; "speedup" compares with the unmodified model run the
same way, "vs eager" with the unmodified eager model. Eager speedups are ``mmskip.timing.paired``
(interleaved rounds, warm-up dropped, median with quartile spread). Compiled figures are
``mmskip.timing.repeated`` per config (median; the compiled speedup is a ratio of medians, not
paired): each config compiles its own graph after ``torch._dynamo.reset()``, so configs cannot be
interleaved without recompiling inside the timed rounds. Decode time is ``generate`` of N new tokens
minus ``generate`` of 1 (the prompt runs in full in decode mode). "bound" is 1 / the decode FLOPs
fraction from ``handle.stats()`` (eager; the LM head counts and never skips). Quality beside speed:
agreement of the compiled greedy tokens with the unmodified model's, teacher-forced
(``mmskip.eval.decode_agreement``) and free-running. Compilation (dynamo + inductor) happens in
the warm-up and is reported separately.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import harness
import torch
from llm_layer_skip import SMOKE_MODEL, build_model, decode_call, prompts
from transformers import CompileConfig

import mmskip
from mmskip import schedules
from mmskip.eval.decode_agreement import decode_agreement


def configs() -> dict[str, mmskip.SkipConfig | None]:
    return {
        "baseline": None,
        "unified s=1.5": mmskip.LayerSkipConfig(schedule=schedules.unified(1.5)),
        "unified s=2": mmskip.LayerSkipConfig(schedule=schedules.unified(2.0)),
    }


def decode_seconds(model, ids, new_tokens: int, compiled: CompileConfig | None, repeats: int) -> tuple[list, torch.Tensor]:
    """Per repeat: seconds of ``generate(new_tokens)`` minus ``generate(1)`` (``harness.repeated``); and the tokens."""
    kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    if compiled is not None:
        kw.update(cache_implementation="static", compile_config=compiled)

    def gen(n: int):
        return torch.no_grad()(lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw))

    times = harness.repeated(harness.Candidate(gen(new_tokens), minus=gen(1)), repeats=repeats, warmup=0)
    return list(times), gen(new_tokens)()[:, ids.shape[1]:]


def compile_config(device: torch.device, backend: str) -> CompileConfig:
    if device.type == "cuda":
        return CompileConfig(fullgraph=True, mode="reduce-overhead", backend=backend)
    config = CompileConfig(fullgraph=True, mode="default", backend=backend)
    config._compile_all_devices = True  # transformers compiles on CPU only when asked
    return config


def run_config(model, ids, args, cfg, compiled: CompileConfig) -> dict:
    torch._dynamo.reset()  # each config compiles its own graph; nothing carries over
    handle = mmskip.apply(model, cfg) if cfg is not None else None
    try:
        def eager(n: int) -> torch.Tensor:
            with torch.no_grad():
                return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                                      attention_mask=torch.ones_like(ids))

        eager_tokens = eager(args.new_tokens)[:, ids.shape[1]:]  # eager timing is paired across configs in main()
        frac = 1.0
        if handle is not None:  # decode FLOPs fraction of one eager generate
            handle.reset_stats()
            eager(1)
            s1, f1 = handle.counts.flops()
            handle.reset_stats()
            eager(args.new_tokens)
            sn, fn = handle.counts.flops()
            frac = (sn - s1) / (fn - f1)
        # compiles (prefill stays eager): a lone figure, the first calls of a fresh graph
        warmup = harness.once(lambda: decode_seconds(model, ids, args.new_tokens, compiled, 2))[0]
        comp_t, comp_tokens = decode_seconds(model, ids, args.new_tokens, compiled, args.repeats)
    finally:
        if handle is not None:
            handle.remove()
    return {"compiled_s": comp_t, "compile_warmup_s": warmup, "flops_fraction": frac,
            "eager_tokens": eager_tokens, "compiled_tokens": comp_tokens, "config": cfg}


def main(argv: list[str] | None = None) -> dict:
    p = harness.arguments(__doc__, threads=2, device=True, smoke=f"{SMOKE_MODEL}, 6 new tokens, dynamo only, 1 round")
    p.add_argument("--model", default="random-24x512")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (the smoke run uses 'eager')")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.batch, args.new_tokens, args.prompt_len, args.repeats, args.backend = (
            SMOKE_MODEL, [1], 6, 8, 3, "eager")
    harness.setup(args)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model, tok = build_model(args.model)
    model = model.to(device=device, dtype=dtype)
    compiled = compile_config(device, args.backend)
    rows = []
    for batch in args.batch:
        ids = prompts(model, tok, batch, args.prompt_len).to(device)
        mask = torch.ones_like(ids)
        eager = harness.paired(decode_call(model, ids, mask, args.new_tokens, None),
                               {n: decode_call(model, ids, mask, args.new_tokens, c) for n, c in configs().items()
                                if c is not None}, repeats=args.repeats)
        base_eager_s = list(next(iter(eager.values())).baseline_s)
        runs = {name: run_config(model, ids, args, cfg, compiled) for name, cfg in configs().items()}
        base = runs["baseline"]
        base_comp = statistics.median(base["compiled_s"])
        for name, r in runs.items():
            with mmskip.applied(model, r["config"]) if r["config"] is not None else contextlib.nullcontext():
                forced = decode_agreement(model, ids, mask, base["eager_tokens"])
            t = eager.get(name)
            eager_s = list(t.candidate_s) if t else base_eager_s
            eager_t, comp_t = statistics.median(eager_s), statistics.median(r["compiled_s"])
            rows.append({
                "model": args.model, "batch": batch, "config": name,
                "eager_tokens_per_s": batch * (args.new_tokens - 1) / eager_t,
                "compiled_tokens_per_s": batch * (args.new_tokens - 1) / comp_t,
                "eager_speedup": t.speedup if t else 1.0, "eager_speedup_spread": list(t.spread) if t else [1.0, 1.0],
                "eager_pairs": len(base_eager_s), "compiled_speedup": base_comp / comp_t,
                "compiled_vs_eager_baseline": statistics.median(base_eager_s) / comp_t, "bound": 1.0 / r["flops_fraction"],
                "bound_warning": t.bound_warning(r["flops_fraction"]) if t else None,
                "compile_warmup_s": r["compile_warmup_s"], "decode_agreement": forced,
                "free_running_agreement": float((r["compiled_tokens"] == base["eager_tokens"]).float().mean()),
                "compiled_equals_eager": bool(torch.equal(r["compiled_tokens"], r["eager_tokens"])),
                "eager_s": eager_s, "compiled_s": r["compiled_s"],
            })
    meta = {"model": args.model, "device": harness.machine(device), "dtype": str(dtype).removeprefix("torch."),
            "backend": args.backend, "mode": compiled.mode, "threads": args.threads, "new_tokens": args.new_tokens,
            "prompt_len": args.prompt_len, "repeats": args.repeats, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}
    _print(rows, meta)
    result = {"meta": meta, "rows": rows}
    if args.smoke and not args.out:
        return result
    harness.write(args.out or harness.RESULTS / f"llm_compiled_{args.model}_{device.type}.json", result, indent=2)
    return result


def _print(rows: list[dict], meta: dict) -> None:
    print(f"\n{meta['model']} on {meta['device']} ({meta['dtype']}, {meta['backend']}/{meta['mode']}): "
          f"{meta['new_tokens']} new tokens after {meta['prompt_len']}-token prompts, median of {meta['repeats']} "
          "(eager: paired rounds)")
    print("| batch | config | eager tok/s | compiled tok/s | speedup eager | speedup compiled | bound | "
          "compiled vs eager baseline | compile s | teacher-forced agr. | free-running agr. |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['config']} | {r['eager_tokens_per_s']:.1f} | {r['compiled_tokens_per_s']:.1f} | "
              f"{r['eager_speedup']:.2f}x | {r['compiled_speedup']:.2f}x | {r['bound']:.2f}x | "
              f"{r['compiled_vs_eager_baseline']:.2f}x | {r['compile_warmup_s']:.0f} | {r['decode_agreement']:.2f} | "
              f"{r['free_running_agreement']:.2f} |")


if __name__ == "__main__":
    main()
