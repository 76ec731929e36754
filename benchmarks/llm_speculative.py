"""Self-speculative decoding (SWIFT) vs plain greedy generate and its peers, batch 1, CPU.

    python benchmarks/llm_speculative.py                         # the zoo's stdlib-lm, held-out prompts
    python benchmarks/llm_speculative.py --model random-16x128    # random weights (script check only)
    python benchmarks/llm_speculative.py --smoke                  # seconds: a tiny random model (CI check)

Configs, each timed on the same held-out prompts (``--prompts`` prompts of ``--prompt-len``
tokens from held-out stdlib modules, ``--new-tokens`` greedy tokens each), in ``--repeats``
interleaved rounds against plain after a dropped warm-up round (``mmskip.timing.paired``; applying a
config is untimed setup), with ``torch.set_num_threads(--threads)``:

- ``plain``: ``model.generate`` (greedy), the reference for speed and output.
- ``swift``: ``mmskip.apply(model, SelfSpeculativeConfig(...))`` then ``model.generate`` (which runs
  transformers' ``generate`` with the SWIFT loop as its ``custom_generate``; ``mmskip.swift``).
  Applied afresh each round, so every round pays one on-the-fly layer-set search (in its first
  prompt) and reuses the found set for the other prompts, as SWIFT does across a task's inputs.
- ``swift (found set)``: the layer set found by the first round, given explicitly (no search).
- ``swift (found set) + lookup``: the same, with ``prompt_lookup=--prompt-lookup``: a round whose
  context repeats its last n-gram drafts what followed it (no draft forward), the others draft
  with the layer set.
- ``transformers prompt lookup``: the peer, ``generate(prompt_lookup_num_tokens=--max-draft)``.
- ``early-exit k``: transformers' ``generate(assistant_early_exit=k)`` (draft = first k layers +
  the LM head, verify with the full model; the same cache).
- ``layer-skip ...``: the foundation's static ``LayerSkipConfig`` (lossy: compare equality).

Reported per config: tokens/s over all prompts (median round), ratio to plain (median paired
ratio, quartiles as ``ratio_spread``),
output equality (prompts whose tokens equal plain's) and token agreement, and for speculative
configs the acceptance rate (accepted / drafted tokens) and the mean accepted length (drafted
tokens accepted per full-model verification forward; each verification adds one more token).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import harness
import torch

import mmskip
from mmskip import schedules
from mmskip.registry import get_adapter
from mmskip.swift import SelfSpeculativeConfig


def build(name: str) -> tuple[torch.nn.Module, Any]:
    if name.startswith("random-"):
        from transformers import LlamaConfig, LlamaForCausalLM

        layers, d = (int(x) for x in name.split("-")[1].split("x"))
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=4096, hidden_size=d, intermediate_size=4 * d, num_hidden_layers=layers,
                          num_attention_heads=max(1, d // 32), num_key_value_heads=max(1, d // 32),
                          max_position_embeddings=1024, pad_token_id=0, bos_token_id=0, eos_token_id=None)
        return LlamaForCausalLM(cfg).eval(), None
    from mmskip.eval.lm import load_lm

    return load_lm(name)  # a zoo name or a from_pretrained folder, as float32


def held_out_prompts(tok: Any, n: int, length: int, vocab: int) -> list[torch.Tensor]:
    if tok is None:
        g = torch.Generator().manual_seed(0)
        return [torch.randint(3, vocab, (1, length), generator=g) for _ in range(n)]
    from mmskip.zoo.stdlib_data import read_texts

    prompts = []
    for text in read_texts("test"):
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if ids.shape[1] >= 2 * length:
            start = ids.shape[1] // 3  # from inside the module, not its licence header
            prompts.append(ids[:, start : start + length])
        if len(prompts) == n:
            break
    if len(prompts) < n:
        raise ValueError(f"only {len(prompts)} held-out modules have {2 * length} tokens")
    return prompts


class DraftCounter:
    """Counts the candidates one of transformers' candidate generators proposes (wraps its
    get_candidates); ``kind``: ``EarlyExit`` or ``PromptLookup``."""

    def __init__(self, kind: str) -> None:
        from transformers.generation import candidate_generator as cg

        self.cls = getattr(cg, f"{kind}CandidateGenerator")
        self.original = self.cls.get_candidates
        self.rounds = self.drafted = 0

        def counted(gen_self, input_ids, **kwargs):
            ids, logits = self.original(gen_self, input_ids, **kwargs)
            self.rounds += 1
            self.drafted += ids.shape[1] - input_ids.shape[1]
            return ids, logits

        self.cls.get_candidates = counted

    def remove(self) -> None:
        self.cls.get_candidates = self.original


def generation(model, prompts, new_tokens, kind, arg, sink: list[dict[str, Any]]) -> harness.Candidate:
    """One config's generate over every prompt as a timed call: applying the config (and the draft
    counter) is untimed setup; teardown reads the stats, removes them and appends outputs + counters to ``sink``."""
    state: dict[str, Any] = {}
    extra = {"early_exit": {"assistant_early_exit": arg}, "prompt_lookup": {"prompt_lookup_num_tokens": arg}}.get(kind, {})
    counted = {"early_exit": "EarlyExit", "prompt_lookup": "PromptLookup"}.get(kind)

    def setup() -> None:
        state.clear()
        state["handle"] = mmskip.apply(model, arg) if kind == "apply" else None
        state["calls"] = DraftCounter(counted) if counted else None

    def call() -> None:
        with torch.no_grad():
            state["outs"] = [model.generate(input_ids=ids, max_new_tokens=new_tokens, do_sample=False, **extra)
                             [0, ids.shape[1]:] for ids in prompts]

    def teardown() -> None:
        handle, calls = state["handle"], state["calls"]
        try:
            if "outs" in state:
                sink.append(_result(state["outs"], handle.stats() if handle else {}, calls))
        finally:
            if handle:
                handle.remove()
            if calls:
                calls.remove()

    return harness.Candidate(call, setup, teardown)


def run(model, prompts, new_tokens, kind, arg) -> dict[str, Any]:
    """Generate for every prompt with one config, once; seconds, outputs and speculative counters."""
    sink: list[dict[str, Any]] = []
    seconds = harness.repeated(generation(model, prompts, new_tokens, kind, arg, sink), repeats=1, warmup=0)[0]
    return {"seconds": seconds, **sink[0]}


def _result(outs: list[torch.Tensor], stats: dict[str, Any], calls: DraftCounter | None) -> dict[str, Any]:
    res: dict[str, Any] = {"tokens": outs}
    if "verify_forwards" in stats:
        res.update({k: stats[k] for k in ("acceptance_rate", "mean_accepted_length", "search_seconds", "search_evals",
                                          "layer_set", "matchness", "drafted_tokens", "verify_forwards",
                                          "draft_forwards", "draft_seconds", "verify_seconds", "lookup_rounds",
                                          "lookup_drafted_tokens", "lookup_accepted_tokens")})
        res["draft_ms"] = 1e3 * stats["draft_seconds"] / max(stats["draft_forwards"], 1)
        res["verify_ms"] = 1e3 * stats["verify_seconds"] / max(stats["verify_forwards"], 1)
    if calls:
        # every round is one full-model forward over the candidates and adds accepted + 1 tokens
        accepted = sum(len(o) for o in outs) - calls.rounds
        res.update({"acceptance_rate": accepted / calls.drafted if calls.drafted else 0.0,
                    "mean_accepted_length": accepted / calls.rounds if calls.rounds else 0.0,
                    "drafted_tokens": calls.drafted, "verify_forwards": calls.rounds})
    return res


def main(argv: list[str] | None = None) -> dict:
    p = harness.arguments(__doc__, smoke="a few seconds on a tiny random model (random-4x64, 2 prompts, 1 round): "
                          "checks the script runs")
    p.add_argument("--model", default="stdlib-lm")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--early-exit", type=int, nargs="*", default=None, help="k values (default L/4, L/2, 3L/4)")
    p.add_argument("--skip-ratio", type=float, nargs="*", default=[0.1, 0.2, 0.45],
                   help="SWIFT skip ratios to run (0.45: the paper's; lower suits a small model)")
    p.add_argument("--max-draft", type=int, default=6)
    p.add_argument("--confidence", type=float, default=0.6)
    p.add_argument("--prompt-lookup", type=int, nargs=2, default=[2, 4], metavar=("MIN_N", "MAX_N"),
                   help="n-gram lengths of the '+ lookup' rows (SelfSpeculativeConfig.prompt_lookup)")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.prompts, args.prompt_len, args.new_tokens, args.repeats = "random-4x64", 2, 12, 8, 3
        args.skip_ratio, args.early_exit = [0.3], [2]
        if args.out is None:
            import tempfile

            args.out = Path(tempfile.mkdtemp(prefix="mmskip-bench-")) / "llm_speculative_smoke.json"
    harness.setup(args)
    model, tok = build(args.model)
    L = get_adapter(model).num_layers
    prompts = held_out_prompts(tok, args.prompts, args.prompt_len, model.config.vocab_size)
    ks = args.early_exit if args.early_exit is not None else sorted({max(1, L // 4), L // 2, 3 * L // 4})

    configs: dict[str, tuple[str, Any]] = {"plain": ("plain", None)}
    for r in args.skip_ratio:
        configs[f"swift r={r}"] = ("apply", SelfSpeculativeConfig(skip_ratio=r, max_draft=args.max_draft,
                                                                   confidence=args.confidence))
    for k in ks:
        configs[f"early-exit k={k}"] = ("early_exit", k)
    configs[f"transformers prompt lookup k={args.max_draft}"] = ("prompt_lookup", args.max_draft)
    configs["layer-skip unified 1.25x"] = ("apply", mmskip.LayerSkipConfig(schedule=schedules.unified(1.25)))
    if not args.smoke:
        configs["layer-skip unified 1.5x"] = ("apply", mmskip.LayerSkipConfig(schedule=schedules.unified(1.5)))

    warm = [prompts[0][:, : args.prompt_len // 2]]
    for kind, arg in configs.values():
        run(model, warm, 8, kind, arg)
    first = {}  # a first SWIFT pass over the prompts; its layer set is the "found set" row
    for name in [n for n in configs if n.startswith("swift r=")]:
        res = run(model, prompts, args.new_tokens, *configs[name])
        first[name] = res["layer_set"]
        found = {"attn_skip": tuple(res["layer_set"]["attn_skip"]), "mlp_skip": tuple(res["layer_set"]["mlp_skip"]),
                 "max_draft": args.max_draft, "confidence": args.confidence}
        configs[name + " (found set)"] = ("apply", SelfSpeculativeConfig(**found))
        configs[name + " (found set) + lookup"] = ("apply", SelfSpeculativeConfig(
            **found, prompt_lookup=tuple(args.prompt_lookup)))

    sinks: dict[str, list[dict]] = {name: [] for name in configs}
    timed = {name: generation(model, prompts, args.new_tokens, kind, arg, sinks[name])
             for name, (kind, arg) in configs.items()}
    timings = harness.paired(timed.pop("plain"), timed, repeats=args.repeats)
    results = {name: sink[-args.repeats:] for name, sink in sinks.items()}  # the measured rounds' counters
    rows = []
    any_t = next(iter(timings.values()))
    base = any_t.baseline_seconds
    ref = results["plain"][0]["tokens"]
    for name, runs in results.items():
        tm = timings.get(name)
        secs = tm.candidate_s if tm else any_t.baseline_s
        t = statistics.median(secs)
        last = runs[-1]
        n_tok = sum(len(o) for o in last["tokens"])
        equal = sum(torch.equal(a, b) for a, b in zip(last["tokens"], ref))
        agree = sum(int((a[: len(b)] == b[: len(a)]).sum()) for a, b in zip(last["tokens"], ref)) / sum(map(len, ref))
        row = {"config": name, "tokens_per_s": n_tok / t, "ratio_vs_plain": tm.speedup if tm else 1.0, "seconds": t,
               "ratio_spread": list(tm.spread) if tm else [1.0, 1.0], "pairs": any_t.pairs,
               "equal_outputs": f"{equal}/{len(ref)}", "token_agreement": agree, "times_s": list(secs)}
        for key in ("acceptance_rate", "mean_accepted_length", "search_seconds", "search_evals", "layer_set",
                    "matchness", "drafted_tokens", "verify_forwards", "draft_forwards", "draft_ms", "verify_ms",
                    "lookup_rounds", "lookup_drafted_tokens", "lookup_accepted_tokens"):
            if key in last:
                vals = [r[key] for r in runs]
                row[key] = statistics.mean(vals) if isinstance(vals[0], float) else last[key]
        rows.append(row)
    meta = {"model": args.model, "layers": L, "threads": args.threads, "prompts": args.prompts,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
            "batch": 1, "torch": torch.__version__, "machine": harness.machine(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "first_search_layer_set": first}
    meta["plain_ms_per_token"] = 1e3 * base / sum(len(o) for o in ref)
    text = _print(rows, meta)
    harness.write(args.out or harness.RESULTS / f"llm_speculative_{args.model}.json", {"meta": meta, "rows": rows},
                  text, indent=2)
    return {"meta": meta, "rows": rows}


def _print(rows: list[dict], meta: dict) -> str:
    lines = [
        f"{meta['model']} ({meta['layers']} layers): {meta['prompts']} held-out prompts x {meta['new_tokens']} greedy "
        f"tokens, batch 1, CPU, torch.set_num_threads({meta['threads']}), median of {meta['repeats']} rounds; "
        f"plain generate {meta['plain_ms_per_token']:.1f} ms/token",
        "",
        "| config | tokens/s | ratio vs plain (IQR) | equal outputs | token agreement | acceptance rate | mean accepted "
        "length | draft / verify forward ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        acc = f"{r['acceptance_rate']:.2f}" if "acceptance_rate" in r else "-"
        mal = f"{r['mean_accepted_length']:.2f}" if "mean_accepted_length" in r else "-"
        ms = f"{r['draft_ms']:.1f} / {r['verify_ms']:.1f}" if "draft_ms" in r else "-"
        lo, hi = r["ratio_spread"]
        lines.append(f"| {r['config']} | {r['tokens_per_s']:.1f} | {r['ratio_vs_plain']:.2f}x ({lo:.2f}-{hi:.2f}) | "
                     f"{r['equal_outputs']} | "
                     f"{r['token_agreement']:.3f} | {acc} | {mal} | {ms} |")
    for r in rows:
        if r.get("layer_set"):
            ls = r["layer_set"]
            lines.append(f"\n{r['config']}: draft skips attention {ls['attn_skip']} and MLP {ls['mlp_skip']}"
                         + (f" (matchness {r['matchness']:.2f}, search {r['search_seconds']:.2f} s / round)"
                            if r.get("matchness") is not None else ""))
    for r in rows:
        if r.get("lookup_rounds"):
            looked, hit = r["lookup_drafted_tokens"], r["lookup_accepted_tokens"]
            lines.append(f"\n{r['config']}: prompt lookup drafted in {r['lookup_rounds']} of {r['verify_forwards']} "
                         f"rounds, {looked} of {r['drafted_tokens']} drafted tokens, "
                         f"acceptance {hit / max(looked, 1):.2f}")
    text = "\n".join(lines)
    print("\n" + text)
    return text


if __name__ == "__main__":
    main()
