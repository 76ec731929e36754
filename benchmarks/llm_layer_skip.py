"""Layer skipping in decoder LMs: measured decode tokens/s vs the unmodified model, with the FLOPs bound.

    python benchmarks/llm_layer_skip.py                      # 24-layer d=512 Llama, random weights
    python benchmarks/llm_layer_skip.py --model stdlib-lm     # the zoo's trained LM, held-out prompts
    python benchmarks/llm_layer_skip.py --smoke               # seconds: tiny random model, one round

All configs run in one process, timed with ``mmskip.timing.paired``: ``--repeats`` interleaved
rounds against the unmodified model after a dropped warm-up round, speedup = median paired ratio
with its quartiles as the spread. Each timed call is ``generate`` for N new tokens minus
``generate`` for 1 (``Candidate.minus``, same applied config): the decode time of N - 1 tokens,
which is what decode-time skipping speeds up (the prompt always runs through every layer in
decode mode); applying and removing the config is untimed setup/teardown. "bound" is 1 / (decode FLOPs
spent / decode FLOPs of the full model) from ``handle.stats()`` on the same calls, counting
the LM head, which never skips. Quality beside speed: agreement of the greedy tokens with the
unmodified model's — teacher-forced while decoding (``mmskip.eval.decode_agreement``: each step
sees the reference context, so one divergence does not spoil the rest) and free-running,
position by position. On random weights these only show how far outputs move.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import harness
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mmskip
from mmskip import schedules
from mmskip.eval.decode_agreement import decode_agreement
from mmskip.registry import get_adapter

SMOKE_MODEL = "random-8x64"


def build_model(name: str) -> tuple[torch.nn.Module, object | None]:
    """The model and, for a trained zoo/local model, its tokenizer."""
    if name == "random-24x512":
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=24,
            num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
            pad_token_id=0, bos_token_id=None, eos_token_id=None,
        )
        return LlamaForCausalLM(cfg).eval(), None
    if name == SMOKE_MODEL:  # --smoke: every code path in seconds, numbers meaningless
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
            pad_token_id=0, bos_token_id=None, eos_token_id=None,
        )
        return LlamaForCausalLM(cfg).eval(), None
    from mmskip import zoo

    model, tok = zoo.load(name)
    return model.eval(), tok


def prompts(model, tok, batch: int, length: int) -> torch.Tensor:
    """Random token ids for a random model; the openings of held-out stdlib modules for the zoo LM."""
    if tok is None:
        g = torch.Generator().manual_seed(batch)
        return torch.randint(3, model.config.vocab_size, (batch, length), generator=g)
    from mmskip.zoo.stdlib_data import read_texts

    rows = [ids[:length] for ids in (tok(t).input_ids for t in read_texts("test")) if len(ids) >= length]
    return torch.tensor(rows[:batch])


def configs(num_layers: int) -> dict[str, mmskip.SkipConfig | None]:
    return {
        "baseline": None,
        "zero-skip config": mmskip.LayerSkipConfig(schedule=schedules.unified(1.0)),
        "unified s=1.5": mmskip.LayerSkipConfig(schedule=schedules.unified(1.5)),
        "unified s=2": mmskip.LayerSkipConfig(schedule=schedules.unified(2.0)),
        "unified s=3": mmskip.LayerSkipConfig(schedule=schedules.unified(3.0)),
        # threshold -1: every hot FFN counts as saturated, so exactly the 25 % budget is skipped
        "ffn-skip 25% (forced)": mmskip.FFNSkipConfig(
            schedule=schedules.adaptive(-1.0, "cosine", warmup=0, max_skip=0.25)
        ),
        "ffn-skip 25% (cos>=0.95)": mmskip.FFNSkipConfig(
            schedule=schedules.adaptive(0.95, "cosine", warmup=4, max_skip=0.25)
        ),
    }


@torch.no_grad()
def run_once(model, ids, mask, new_tokens, config):
    """Decode seconds for new_tokens - 1 tokens, decode FLOPs fraction, generated tokens."""
    handle = mmskip.apply(model, config) if config is not None else None
    seconds, flops = [], []
    try:
        for n in (1, new_tokens):
            if handle:
                handle.reset_stats()
            secs, out = harness.once(lambda n=n: model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                pad_token_id=0))
            seconds.append(secs)
            flops.append(handle.counts.flops() if handle else (1.0, 1.0))
    finally:
        if handle:
            handle.remove()
    (s1, f1), (sn, fn) = flops
    frac = (sn - s1) / (fn - f1) if handle else 1.0
    return seconds[1] - seconds[0], frac, out[:, ids.shape[1]:]


def decode_call(model, ids, mask, new_tokens, config) -> harness.Candidate:
    """``generate(new_tokens) - generate(1)`` with ``config`` applied around the pair (untimed)."""
    held: dict = {}

    def gen(n: int):
        return lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=0)

    def setup() -> None:
        if config is not None:
            held["h"] = mmskip.apply(model, config)

    def teardown() -> None:
        if "h" in held:
            held.pop("h").remove()

    return harness.Candidate(torch.no_grad()(gen(new_tokens)), setup, teardown, minus=torch.no_grad()(gen(1)))


def main(argv: list[str] | None = None) -> dict:
    p = harness.arguments(__doc__, smoke=f"seconds-long run that exercises every path: {SMOKE_MODEL} random model, "
                          "batch 1, 6 new tokens, 1 round")
    p.add_argument("--model", default="random-24x512")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.batch, args.new_tokens, args.prompt_len, args.repeats = SMOKE_MODEL, [1], 6, 8, 3
    harness.setup(args)
    model, tok = build_model(args.model)
    L = get_adapter(model).num_layers
    cfgs = configs(L)
    rows = []
    for batch in args.batch:
        ids = prompts(model, tok, batch, args.prompt_len)
        mask = torch.ones_like(ids)
        fracs, tokens = {}, {}
        for name, cfg in cfgs.items():  # untimed: decode FLOPs and tokens (greedy, so every run's)
            _, fracs[name], tokens[name] = run_once(model, ids, mask, args.new_tokens, cfg)
        timings = harness.paired(decode_call(model, ids, mask, args.new_tokens, None),
                                 {n: decode_call(model, ids, mask, args.new_tokens, c) for n, c in cfgs.items()
                                  if c is not None}, repeats=args.repeats)
        any_t = next(iter(timings.values()))
        forced = {}
        for name, cfg in cfgs.items():
            with mmskip.applied(model, cfg) if cfg else contextlib.nullcontext():
                forced[name] = decode_agreement(model, ids, mask, tokens["baseline"])
        for name in cfgs:
            t = timings.get(name)
            secs = t.candidate_s if t else any_t.baseline_s
            median_s = t.seconds if t else any_t.baseline_seconds
            speedup, bound = (t.speedup if t else 1.0), 1.0 / fracs[name]
            rows.append({
                "model": args.model, "batch": batch, "config": name,
                "decode_tokens_per_s": batch * (args.new_tokens - 1) / median_s, "speedup": speedup, "bound": bound,
                "speedup_spread": list(t.spread) if t else [1.0, 1.0], "pairs": any_t.pairs,
                "speedup_over_bound": speedup / bound, "flops_fraction": fracs[name],
                "bound_warning": t.bound_warning(fracs[name]) if t else None,
                "decode_agreement": forced[name],
                "free_running_agreement": float((tokens[name] == tokens["baseline"]).float().mean()),
                "times_s": list(secs),
            })
    _print(rows, args)
    meta = {
        "model": args.model, "threads": args.threads, "new_tokens": args.new_tokens, "prompt_len": args.prompt_len,
        "repeats": args.repeats, "torch": torch.__version__, "machine": harness.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.smoke and not args.out:
        return {"meta": meta, "rows": rows}
    harness.write(args.out or harness.RESULTS / f"llm_layer_skip_{args.model}.json", {"meta": meta, "rows": rows},
                  indent=2)
    return {"meta": meta, "rows": rows}


def _print(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"\n{args.model}: {args.new_tokens} new tokens after {args.prompt_len}-token prompts, "
          f"CPU, {args.threads} thread(s), median of {args.repeats} paired rounds (quartiles in the JSON)")
    print("| batch | config | decode tokens/s | speedup | bound | speedup/bound | teacher-forced agreement | free-running agreement |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['config']} | {r['decode_tokens_per_s']:.1f} | {r['speedup']:.2f}x | "
              f"{r['bound']:.2f}x | {r['speedup_over_bound']:.2f} | {r['decode_agreement']:.2f} | {r['free_running_agreement']:.2f} |")


if __name__ == "__main__":
    main()
