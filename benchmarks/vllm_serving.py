"""mmskip in vLLM: tokens/s at 1 / 8 / 32 concurrent requests, acceptance and agreement, for plain
vLLM, vLLM's n-gram drafter, mmskip self-speculation (early exit, a layer set) and mmskip layer
skipping; offline ``LLM.generate``, or (``--server``) vLLM's OpenAI server queried by the
``openai`` client with streaming, adding time to first token, inter-token latency and memory.

Runs in the vLLM environment (``bash run.sh test`` builds ``.venv-vllm``)::

    .venv-vllm/bin/python benchmarks/vllm_serving.py [--server] [--smoke] [--model stdlib-lm-skip]

The plot (tokens/s per method and concurrency, ``.png`` beside the JSON) needs matplotlib, which
the vLLM environment lacks; draw it from the saved JSON, running nothing, in mmskip's environment::

    python benchmarks/vllm_serving.py --plot-only [--server] [--model stdlib-lm-skip]

Every engine is loaded once, then the rounds interleave them (order rotated each round, one warm-up
round dropped): each round times one batch per engine and concurrency, and the table gives the
median speed ratio to plain vLLM of the same round with its quartiles. Concurrency c means c
requests submitted together (c = 1: requests one after another). Lossless methods' greedy tokens
are checked equal to plain vLLM's; layer skipping's agreement (share of tokens equal to plain
vLLM's, position by position) is printed beside its speed with its FLOPs bound.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # the drafter's stats from the worker

import harness  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests_vllm.support import ENGINE, ZOO, held_out_prompts  # noqa: E402

CUSTOM = "mmskip_vllm.SelfSpeculativeProposer"


def late(num_layers: int) -> tuple[int, ...]:
    """The six layers below the last one: on stdlib-lm-skip (24 layers) 17-22, the card's
    'explicit 6' set (teacher-forced token agreement 0.83)."""
    return tuple(range(num_layers - 7, num_layers - 1))


def num_layers(model: str) -> int:
    return int(json.loads((ZOO / model / "config.json").read_text())["num_hidden_layers"])


DEFAULT_OUT = harness.RESULTS / "vllm_serving.json"


def methods(k: int, layers: int) -> dict[str, dict[str, Any]]:
    """Engine keyword arguments per method for a model of ``layers`` layers."""
    skip = late(layers)
    span = f"{skip[0]}-{skip[-1]}"
    spec = {"method": "custom_class", "model": CUSTOM, "num_speculative_tokens": k}
    return {
        "plain": {},
        "ngram": {"speculative_config": {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4,
                                         "prompt_lookup_min": 2}},
        "mmskip early exit 8": {"hf_overrides": {"mmskip_draft": {"exit_layer": 8}}, "speculative_config": spec},
        "mmskip early exit 12": {"hf_overrides": {"mmskip_draft": {"exit_layer": 12}}, "speculative_config": spec},
        "mmskip lookup + early exit 12": {"hf_overrides": {"mmskip_draft": {"exit_layer": 12, "prompt_lookup": True}},
                                          "speculative_config": spec},
        # vLLM's dynamic speculative decoding, off above 4 requests like mmskip's paused drafter:
        # whether that spares larger batches vLLM's speculative path (it made no clear difference here)
        "mmskip lookup + early exit 12, dynamic": {
            "hf_overrides": {"mmskip_draft": {"exit_layer": 12, "prompt_lookup": True}},
            "speculative_config": {**spec, "num_speculative_tokens_per_batch_size": [[1, 4, k], [5, 1024, 0]]}},
        f"mmskip layer set {span}": {"hf_overrides": {"mmskip_draft": {"attn_skip": list(skip), "mlp_skip": list(skip)}},
                                     "speculative_config": spec},
        f"mmskip layer skip {span}": {"hf_overrides": {"architectures": ["MmskipLlamaForCausalLM"],
                                                       "mmskip_layer_skip": _layer_skip_dict(skip)}},
    }


def chosen(all_methods: dict[str, dict[str, Any]], words: list[str] | None) -> dict[str, dict[str, Any]]:
    """``plain`` and the methods whose names contain one of ``words`` (every method without words)."""
    if not words:
        return all_methods
    picked = {n: kw for n, kw in all_methods.items() if n == "plain" or any(w in n for w in words)}
    if len(picked) == 1:
        raise SystemExit(f"--methods {words} names no method; methods: {list(all_methods)}")
    return picked


def _layer_skip_dict(skip: tuple[int, ...]) -> dict[str, Any]:
    from mmskip.layer_skip import LayerSkipConfig
    from mmskip.schedules import explicit

    return LayerSkipConfig(schedule=explicit(skip=skip), phase="all").to_dict()


def flops_bound(model: str) -> float:
    """Speed bound of skipping ``late(L)``: per-token multiply-adds kept (decoder layers' projections
    and MLP, plus the LM head that always runs; attention scores left out)."""
    import json

    c = json.loads((ZOO / model / "config.json").read_text())
    d, f, v, n = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    kv = c["num_key_value_heads"] * c.get("head_dim", d // c["num_attention_heads"])
    layer = d * (d + 2 * kv) + d * d + 3 * d * f
    return (n * layer + d * v) / ((n - len(late(n))) * layer + d * v)


def run_batch(llm: Any, prompts: list[str], c: int, params: Any) -> tuple[float, list[list[int]]]:
    """Seconds to serve ``prompts`` c at a time, and the tokens."""
    tokens: list[list[int]] = []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), c):
        outs = llm.generate(prompts[i:i + c], params, use_tqdm=False)
        tokens += [list(o.outputs[0].token_ids) for o in outs]
    return time.perf_counter() - t0, tokens


def main(argv: list[str] | None = None) -> None:
    p = harness.arguments(__doc__, repeats=5, threads=None, out=DEFAULT_OUT, full_doc=True)
    p.add_argument("--model", default="stdlib-lm-skip")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument("--server", action="store_true", help="measure vLLM's OpenAI server instead of LLM.generate")
    p.add_argument("--methods", nargs="+", metavar="NAME",
                   help="run only the methods whose names contain one of these words (plain always runs)")
    p.add_argument("--concurrency", type=int, nargs="+", help="concurrency levels (default 1 8 32; smoke: 1 8)")
    p.add_argument("--plot-only", action="store_true",
                   help="redraw the .png beside the saved JSON (of --server, --model) and run nothing")
    args = p.parse_args(argv)
    if args.plot_only:
        path = results_path(args)
        if not path.is_file():
            raise SystemExit(f"--plot-only: no results at {path}; run the benchmark first (without --plot-only)")
        plot(json.loads(path.read_text()), path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}")
        return
    if args.server:
        from _vllm_server_bench import run_servers

        path = results_path(args)
        run_servers(args, chosen(methods(args.k, num_layers(args.model)), args.methods), path)
        if _has_matplotlib():
            plot(json.loads(path.read_text()), path.with_suffix(".png"))
        return
    from vllm import LLM, SamplingParams

    conc = tuple(args.concurrency or ((1, 8) if args.smoke else (1, 8, 32)))
    rounds = 1 if args.smoke else args.repeats
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    prompts = {c: held_out_prompts(4 if c == 1 else c) for c in conc}
    engines = {}
    for name, kw in chosen(methods(args.k, num_layers(args.model)), args.methods).items():
        t0 = time.perf_counter()
        engines[name] = LLM(model=str(ZOO / args.model), **ENGINE, **kw)
        print(f"loaded {name} in {time.perf_counter() - t0:.0f} s", flush=True)
    names = list(engines)
    secs: dict[tuple[str, int], list[float]] = {(n, c): [] for n in names for c in conc}
    toks: dict[tuple[str, int], list[list[int]]] = {}
    for r in range(rounds + 1):  # round 0: warm-up, dropped
        order = names[r % len(names):] + names[:r % len(names)]
        for c in conc:
            for n in order:
                s, t = run_batch(engines[n], prompts[c], c, params)
                if r:
                    secs[(n, c)].append(s)
                toks[(n, c)] = t
        if r == 0:
                print(f"round {r} done", flush=True)
    rows, result = [], {"model": args.model, "k": args.k, "tokens": args.tokens, "rounds": rounds,
                        "machine": harness.machine(), "concurrency": list(conc), "methods": {}}
    bound = flops_bound(args.model)
    for n in names:
        # vLLM's spec-decode counters live in one Prometheus registry that each new engine of the
        # process resets, so acceptance here is the mmskip drafter's own count (warm-up included);
        # the --server run reads every method's counters from its server's /metrics
        entry: dict[str, Any] = {"acceptance": None}
        if n.startswith("mmskip") and "layer skip" not in n:
            entry["drafter"] = engines[n].collective_rpc(_drafter_stats)[0]
            entry["acceptance"] = entry["drafter"]["acceptance"]
        for c in conc:
            ratios = [b / a for a, b in zip(secs[(n, c)], secs[("plain", c)])]
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
            ntok = len(prompts[c]) * args.tokens
            same = [x == y for a, b in zip(toks[(n, c)], toks[("plain", c)]) for x, y in zip(a, b)]
            entry[f"c{c}"] = {"tokens_per_s": ntok / statistics.median(secs[(n, c)]), "speedup_median": q[1],
                              "speedup_q1": q[0], "speedup_q3": q[2], "seconds": secs[(n, c)],
                              "agreement": sum(same) / len(same), "equal_to_plain": toks[(n, c)] == toks[("plain", c)]}
        result["methods"][n] = entry
        cells = [f"{entry[f'c{c}']['tokens_per_s']:.0f} ({entry[f'c{c}']['speedup_median']:.2f}x, "
                 f"{entry[f'c{c}']['speedup_q1']:.2f}-{entry[f'c{c}']['speedup_q3']:.2f})" for c in conc]
        acc = f"{entry['acceptance']:.2f}" if entry["acceptance"] is not None else "-"
        agree = min(entry[f"c{c}"]["agreement"] for c in conc)
        rows.append([n, *cells, acc, f"{agree:.3f}"])
    result["layer_skip_flops_bound"] = bound
    header = ["method", *[f"c={c}: tok/s (x plain, IQR)" for c in conc], "acceptance", "agreement"]
    md = (f"# vLLM serving, offline ({args.model}, float32, k={args.k}, {args.tokens} new tokens, "
          f"{rounds} paired rounds, {harness.machine()})\n\n" + harness.table(header, rows, "l" + "r" * (len(header) - 1))
          + f"\n\nLayer skip {'-'.join(map(str, late(num_layers(args.model))[::5]))}: FLOPs bound {bound:.2f}x (LM head and embeddings counted, attention scores not).\n")
    print(md)
    for e in engines.values():
        e.llm_engine.engine_core.shutdown()
    out = results_path(args)
    harness.write(out, result, md, plot=(lambda png: plot(result, png)) if _has_matplotlib() else None)


def results_path(args: Any) -> Path:
    """Where a run with these arguments writes its JSON (the ``.md`` and ``.png`` go beside it): an
    ``--out`` given on the command line as is, else a name from the mode and the model."""
    if args.out != DEFAULT_OUT:
        return args.out
    if args.server:
        return args.out.with_name("vllm_serving_server" + ("_smoke" if args.smoke else "") + ".json")
    out = args.out if args.model == "stdlib-lm-skip" else args.out.with_name(f"vllm_serving_{args.model}.json")
    return out if not args.smoke else out.with_name(out.stem + "_smoke.json")


def _has_matplotlib() -> bool:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib missing here: draw the plot with --plot-only in mmskip's environment")
        return False
    return True


def plot(result: dict[str, Any], png: Path) -> None:
    """One panel per concurrency: each method's tokens/s (median over rounds), labelled with its
    median speed ratio to plain vLLM in the same rounds."""
    names, conc = list(result["methods"]), result["concurrency"]
    fig = harness.figure(figsize=(3.6 * len(conc) + 1.8, 0.42 * len(names) + 1.6))
    axes = fig.subplots(1, len(conc), sharey=True, squeeze=False)[0]
    colors = ["0.55" if n == "plain" else "C1" if n == "ngram" else "C2" if "layer skip" in n else "C0" for n in names]
    for ax, c in zip(axes, conc):
        cells = [result["methods"][n][f"c{c}"] for n in names]
        tps = [cell["tokens_per_s"] for cell in cells]
        ax.barh(range(len(names)), tps, color=colors)
        for y, (t, cell) in enumerate(zip(tps, cells)):
            ax.text(t, y, f" {cell['speedup_median']:.2f}x", va="center", fontsize=8)
        ax.set_xlim(0, 1.3 * max(tps))
        ax.set_title(f"{c} concurrent request{'s' if c > 1 else ''}", fontsize=10)
        ax.set_xlabel("tokens/s")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(names)), names, fontsize=9)
    axes[0].invert_yaxis()
    where = "OpenAI server" if "ttft_p50" in result["methods"]["plain"][f"c{conc[0]}"] else "offline LLM.generate"
    fig.suptitle(f"vLLM serving {result['model']}, {where}: {result['rounds']} paired rounds, "
                 f"{result['tokens']} new tokens, {result['machine']}; labels: median speed ratio to plain vLLM", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def _drafter_stats(worker: Any) -> dict[str, Any]:
    return worker.model_runner.drafter.stats()


if __name__ == "__main__":
    main()
