"""The ``--server`` half of ``vllm_serving.py``: one OpenAI-compatible vLLM server per method, all
started at once, then rounds that interleave them (order rotated, a warm-up round dropped). Each
round sends c streaming completions at once (c = 1: four one after another) through the ``openai``
client and records tokens/s, time to first token (TTFT), inter-token latency (ITL: a request's
time from first to last chunk over its tokens after the first) and the servers' memory."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import harness

from tests_vllm.support import ZOO, held_out_prompts, start_server, stop_server, wait_ready

__all__ = ["run_servers"]


def _flags(kw: dict[str, Any]) -> list[str]:
    out = []
    if "hf_overrides" in kw:
        out += ["--hf-overrides", json.dumps(kw["hf_overrides"])]
    if "speculative_config" in kw:
        out += ["--speculative-config", json.dumps(kw["speculative_config"])]
    return out


def _request(port: int, prompt: str, tokens: int) -> tuple[float, list[float], int]:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=600)
    t0, arrivals, n = time.perf_counter(), [], 0
    stream = client.completions.create(model="lm", prompt=prompt, stream=True, temperature=0.0, max_tokens=tokens,
                                       extra_body={"ignore_eos": True}, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            arrivals.append(time.perf_counter())
        if chunk.usage:
            n = chunk.usage.completion_tokens
    return t0, arrivals, n


def _round(port: int, prompts: list[str], c: int, tokens: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(c) as pool:
        done = list(pool.map(lambda p: _request(port, p, tokens), prompts))
    wall = time.perf_counter() - t0
    return {"seconds": wall, "tokens": sum(n for _, _, n in done),
            "ttft": [a[0] - s for s, a, _ in done if a],
            "itl": [(a[-1] - a[0]) / (n - 1) for _, a, n in done if len(a) > 1 and n > 1]}


def _acceptance(port: int) -> float | None:
    """Accepted / drafted tokens from the server's Prometheus counters (None without drafts)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    counts = {}
    for line in text.splitlines():
        for key in ("vllm:spec_decode_num_draft_tokens_total", "vllm:spec_decode_num_accepted_tokens_total"):
            if line.startswith(key + "{") or line.startswith(key + " "):
                counts[key] = counts.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    drafted = counts.get("vllm:spec_decode_num_draft_tokens_total", 0.0)
    return counts.get("vllm:spec_decode_num_accepted_tokens_total", 0.0) / drafted if drafted else None


def _rss(proc: Any) -> int:
    import psutil

    root = psutil.Process(proc.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def run_servers(args: Any, methods: dict[str, dict[str, Any]], out: Path) -> None:
    """Start every method's server, run the interleaved rounds, write JSON and Markdown to ``out``
    (``.json``; the ``.md`` beside it)."""
    conc = (1, 8) if args.smoke else (1, 8, 32)
    rounds = 1 if args.smoke else args.repeats
    prompts = {c: held_out_prompts(4 if c == 1 else c) for c in conc}
    tmp = Path(tempfile.mkdtemp(prefix="vllm_bench_"))
    servers: dict[str, tuple[Any, int, Path]] = {}
    try:
        for name, kw in methods.items():
            (tmp / str(len(servers))).mkdir()
            servers[name] = start_server(_flags(kw), tmp / str(len(servers)), str(ZOO / args.model))
        for proc, port, log in servers.values():
            wait_ready(proc, port, log)
        print(f"{len(servers)} servers ready", flush=True)
        names = list(servers)
        data: dict[tuple[str, int], list[dict[str, Any]]] = {(n, c): [] for n in names for c in conc}
        for r in range(rounds + 1):
            order = names[r % len(names):] + names[:r % len(names)]
            for c in conc:
                for n in order:
                    out = _round(servers[n][1], prompts[c], c, args.tokens)
                    if r:
                        data[(n, c)].append(out)
            print(f"server round {r} done", flush=True)
        memory = {n: _rss(servers[n][0]) for n in names}
        acceptance = {n: _acceptance(servers[n][1]) for n in names}
    finally:
        for proc, _, _ in servers.values():
            stop_server(proc)
    result: dict[str, Any] = {"model": args.model, "k": args.k, "tokens": args.tokens, "rounds": rounds,
                              "machine": harness.machine(), "concurrency": list(conc), "methods": {}}
    rows = []
    for n in names:
        entry: dict[str, Any] = {"rss_bytes": memory[n], "acceptance": acceptance[n]}
        for c in conc:
            runs, base = data[(n, c)], data[("plain", c)]
            ratios = [b["seconds"] / a["seconds"] for a, b in zip(runs, base)]
            ttft = [x for run in runs for x in run["ttft"]]
            itl = [x for run in runs for x in run["itl"]]
            entry[f"c{c}"] = {"tokens_per_s": statistics.median(run["tokens"] / run["seconds"] for run in runs),
                              "speedup_median": statistics.median(ratios), "speedup_min": min(ratios),
                              "speedup_max": max(ratios), "ttft_p50": _pct(ttft, 0.5), "ttft_p99": _pct(ttft, 0.99),
                              "itl_p50": _pct(itl, 0.5), "itl_p99": _pct(itl, 0.99)}
            e = entry[f"c{c}"]
            rows.append([n, c, f"{e['tokens_per_s']:.0f}", f"{e['speedup_median']:.2f}x ({e['speedup_min']:.2f}-"
                         f"{e['speedup_max']:.2f})", f"{1e3 * e['ttft_p50']:.0f} / {1e3 * e['ttft_p99']:.0f}",
                         f"{1e3 * e['itl_p50']:.1f} / {1e3 * e['itl_p99']:.1f}",
                         "-" if acceptance[n] is None else f"{acceptance[n]:.2f}", f"{memory[n] / 2**30:.2f}"])
        result["methods"][n] = entry
    header = ["method", "c", "tok/s", "x plain (min-max)", "TTFT p50 / p99 ms", "ITL p50 / p99 ms", "acceptance", "RSS GiB"]
    md = (f"# vLLM serving, OpenAI server ({args.model}, float32, k={args.k}, {args.tokens} new tokens, "
          f"{rounds} paired rounds, {harness.machine()})\n\n" + harness.table(header, rows, "lrrrrrrr")
          + "\n\nRSS: resident memory summed over the server's processes (API server, engine core, worker; "
          "shared pages counted in each).\n")
    print(md)
    harness.write(out, result, md)
