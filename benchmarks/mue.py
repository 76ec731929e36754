"""MuE early exits on ``digits-florence``: exact match / BLEU vs decode time and layer-token computations (#10 item 5).

    python benchmarks/mue.py                                  # zoo digits-florence, 50 held-out strips per task
    python benchmarks/mue.py --model runs/zoo/digits-florence # any from_pretrained folder with its tokenizer
    python benchmarks/mue.py --smoke                          # seconds: tiny random Florence-2
    python benchmarks/mue.py --family t5gemma2                # random T5Gemma 2: speed and FLOPs only

Configs, all on the same model, greedy generation at batch 1 (up to 12 new tokens):

* **unmodified**;
* **MuE** (``mmskip.vision.MuEConfig``) at several thresholds: decoder exits only (encoder thresholds
  ``None``), and decoder + encoder exits (image and text tokens at one threshold); ``decay`` 1 (the trained
  model needs no decaying threshold for answers of at most 12 tokens), ``floor`` = the decoder threshold,
  ``min_layers`` 1;
* **static truncation** (a peer, here with hooks: the layer lists are cut for the run): the last ``k``
  decoder layers (the LM head reads layer ``L-k``'s output, what layer-wise training makes usable), and the
  last encoder layers;
* **CALM-style confidence exit** (a peer, here with hooks): after each decoder layer from ``min_layers`` = 1
  on, the token's state goes through the LM head; when the softmax maximum exceeds the threshold the token
  exits, passing its state through the deeper layers, which compute only their self-attention K/V from it
  (the same state-copying KV rule as MuE). The extra LM-head calls are counted in the time, not in the
  layer-token counts.

Measured per config on the held-out strips (the recipe's held-out set, the first N per task):

* exact match per task and overall, caption BLEU-4 (torchmetrics ``BLEUScore``), and agreement with the
  unmodified model's output;
* layer-token computations: encoder (image + text tokens x layers run) and decoder (generated tokens x layers
  run), as fractions of the unmodified model's; MuE's from ``handle.stats()`` after each generation;
* time: ``mmskip.timing.paired`` over chunks of 10 strips, every chunk ``--repeats`` times (at least 3 rounds):
  the unmodified model and the config on the same chunk in each interleaved round, 1 thread; *decode time* = the whole ``generate`` call (vision tower,
  encoder, decoding loop), *decoder time* = the time spent inside the BART decoder's forward calls (measured
  with module hooks on both sides of the pair); fraction = median over chunk pairs of config / unmodified.

The issue's goal: >= 40 % less decoding time at >= 97 % of the unaccelerated exact match.

``--family t5gemma2`` (``benchmarks/_mue_t5gemma2.py``) runs MuE on the second family, T5Gemma 2, with
*random* weights (no trained one here): times, layer-token and FLOPs fractions only, no quality.
"""

from __future__ import annotations

import math
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import harness
import torch
from mmskip.vision.mue import MuEConfig

import mmskip
from mmskip._phase import get_cache
from mmskip.zoo import florence_data as D

SMOKE_MODEL = "tiny random Florence-2 (2+2 layers, d=32)"
MAX_NEW_TOKENS = 12
CHUNK = 10


class Setup(NamedTuple):
    name: str
    kind: str  # plain | mue | truncate | calm
    params: dict[str, Any] = {}


def configs(enc_layers: int, dec_layers: int, smoke: bool = False) -> list[Setup]:
    s = [Setup("unmodified", "plain")]
    if smoke:  # one of each kind
        return s + [Setup("MuE dec 0.9", "mue", {"decoder": 0.9, "encoder": None}),
                    Setup("MuE enc 0.95 + dec 0.9", "mue", {"decoder": 0.9, "encoder": 0.95}),
                    Setup(f"truncate dec {dec_layers - 1}/{dec_layers}", "truncate",
                          {"dec": dec_layers - 1, "enc": enc_layers}),
                    Setup("CALM conf 0.9", "calm", {"threshold": 0.9})]
    for t in (0.98, 0.96, 0.93, 0.9, 0.85):
        s.append(Setup(f"MuE dec {t}", "mue", {"decoder": t, "encoder": None}))
    for e, t in ((0.95, 0.93), (0.9, 0.9), (0.85, 0.85)):
        s.append(Setup(f"MuE enc {e} + dec {t}", "mue", {"decoder": t, "encoder": e}))
    for k in range(1, dec_layers):
        s.append(Setup(f"truncate dec {dec_layers - k}/{dec_layers}", "truncate", {"dec": dec_layers - k,
                                                                                  "enc": enc_layers}))
    if enc_layers > 2:
        s.append(Setup(f"truncate enc {enc_layers - 1}/{enc_layers} + dec {dec_layers - 1}/{dec_layers}", "truncate",
                       {"dec": dec_layers - 1, "enc": enc_layers - 1}))
    for t in (0.999, 0.99, 0.95, 0.9):
        s.append(Setup(f"CALM conf {t}", "calm", {"threshold": t}))
    return s


def build_model(name: str, smoke: bool = False):
    """``(model, tokenizer)``: the smoke model (random tiny Florence-2), a zoo name or a folder."""
    if smoke:
        from mmskip.zoo.florence_model import make_model

        torch.manual_seed(0)
        return make_model("tiny").eval(), D.build_tokenizer()
    from transformers import AutoTokenizer, Florence2ForConditionalGeneration

    folder = mmskip.zoo.path(name) if name in mmskip.zoo.NAMES else Path(name)
    model = Florence2ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


# -- peers, with hooks ------------------------------------------------------------------------------


class Calm:
    """CALM-style confidence exit for batch-1 generation: after decoder layer ``i`` (``i + 1 >= min_layers``,
    not the last) the state goes through the LM head; softmax max > ``threshold`` -> the token exits and the
    deeper layers only append their self-attention K/V of the copied state to the cache."""

    def __init__(self, model, threshold: float, min_layers: int = 1) -> None:
        text = model.model.language_model
        self.model, self.threshold, self.min_layers = model, threshold, min_layers
        self.layers = text.decoder.layers
        self.exited = False
        self.run = self.layer_tokens = 0
        self._handles = [text.decoder.register_forward_pre_hook(self._reset)]
        self._orig = []
        for i, layer in enumerate(self.layers):
            self._orig.append(layer.forward)
            layer.forward = self._wrap(i, layer, layer.forward)

    def _reset(self, module, args) -> None:
        self.exited = False

    def _wrap(self, i: int, layer, forward):
        def fwd(*args, **kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            if h.shape[0] != 1:
                raise ValueError("the CALM peer is for batch-1 generation")
            self.layer_tokens += h.shape[1]
            if self.exited:
                cache = get_cache(kwargs)
                if cache is not None and kwargs.get("use_cache", True) is not False:
                    attn = layer.self_attn
                    shape = (*h.shape[:-1], -1, attn.head_dim)
                    k = attn.k_proj(h).view(shape).transpose(1, 2)
                    v = attn.v_proj(h).view(shape).transpose(1, 2)
                    getattr(cache, "self_attention_cache", cache).update(k, v, attn.layer_idx)
                return h
            out = forward(*args, **kwargs)
            self.run += h.shape[1]
            if i + 1 >= self.min_layers and i < len(self.layers) - 1:
                conf = torch.softmax(self.model.lm_head(out[:, -1]).float(), -1).max()
                self.exited = bool(conf > self.threshold)
            return out

        return fwd

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for layer, f in zip(self.layers, self._orig, strict=True):
            layer.forward = f


class Truncate:
    """Static truncation: keep the first ``enc``/``dec`` encoder/decoder layers for the run."""

    def __init__(self, model, enc: int, dec: int) -> None:
        text = model.model.language_model
        self.enc, self.dec = text.encoder, text.decoder
        self.full = (self.enc.layers, self.dec.layers)
        self.enc.layers = torch.nn.ModuleList(list(self.full[0])[:enc])
        self.dec.layers = torch.nn.ModuleList(list(self.full[1])[:dec])

    def remove(self) -> None:
        self.enc.layers, self.dec.layers = self.full


@contextmanager
def attached(model, setup: Setup):
    obj = None
    if setup.kind == "mue":
        p = setup.params
        cfg = MuEConfig(image_threshold=p["encoder"], text_threshold=p["encoder"], decoder_threshold=p["decoder"],
                        decay=1.0, floor=p["decoder"], min_layers=1)
        obj = mmskip.apply(model, cfg)
    elif setup.kind == "truncate":
        obj = Truncate(model, **setup.params)
    elif setup.kind == "calm":
        obj = Calm(model, **setup.params)
    try:
        yield obj
    finally:
        if obj is not None:
            obj.remove()


class DecoderClock:
    """Seconds spent inside the BART decoder's forward calls (pre/post module hooks)."""

    def __init__(self, model) -> None:
        dec = model.model.language_model.decoder
        self.seconds, self._t = 0.0, 0.0
        self._h = [dec.register_forward_pre_hook(self._pre), dec.register_forward_hook(self._post)]

    def _pre(self, *a) -> None:
        self._t = time.perf_counter()

    def _post(self, *a) -> None:
        self.seconds += time.perf_counter() - self._t

    def remove(self) -> None:
        for h in self._h:
            h.remove()


def generate_one(model, tok, data: D.Batch, i: int) -> str:
    out = model.generate(input_ids=data.input_ids[i:i + 1, : int(data.attention_mask[i].sum())],
                         pixel_values=data.pixel_values[i:i + 1], max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return tok.decode(out[0], skip_special_tokens=True).strip()


def _chunk_runner(model, tok, data: D.Batch, chunks: list[list[int]], decoder_s: list[float]):
    """A call that generates the next chunk's strips (cycling) and appends its decoder seconds to ``decoder_s``."""
    state = {"i": 0}

    def call() -> None:
        idx = chunks[state["i"] % len(chunks)]
        state["i"] += 1
        clock = DecoderClock(model)
        try:
            with torch.no_grad():
                for i in idx:
                    generate_one(model, tok, data, i)
            decoder_s.append(clock.seconds)
        finally:
            clock.remove()

    return call


def _paired_chunks(model, tok, setup: Setup, data: D.Batch, repeats: int) -> tuple[Any, list[float], list[float], int]:
    """The unmodified model and the config on the same chunk in each round of ``harness.paired`` (every chunk
    ``repeats`` times, at least 3 rounds); attaching the config is untimed setup. Returns the timing,
    both sides' decoder seconds per round and the strips timed per side."""
    order = list(range(len(data)))
    chunks = [order[a:a + CHUNK] for a in range(0, len(order), CHUNK)]
    dec_plain: list[float] = []
    dec_cfg: list[float] = []
    held: dict[str, Any] = {}

    def attach() -> None:
        held["cm"] = attached(model, setup)
        held["cm"].__enter__()

    cand = harness.Candidate(_chunk_runner(model, tok, data, chunks, dec_cfg), attach,
                             lambda: held.pop("cm").__exit__(None, None, None))
    t = harness.paired(_chunk_runner(model, tok, data, chunks, dec_plain), {"cfg": cand},
                       repeats=max(3, len(chunks) * repeats), warmup=0)["cfg"]
    return t, dec_plain, dec_cfg, sum(len(chunks[r % len(chunks)]) for r in range(t.pairs))


def run_config(model, tok, setup: Setup, data: D.Batch, plain_preds: list[str] | None, args, n_enc: int,
               n_dec: int) -> dict[str, Any]:
    preds: list[str] = []
    enc_run = enc_all = dec_run = dec_all = 0.0
    with torch.no_grad(), attached(model, setup) as obj:
        for i in range(len(data)):
            preds.append(generate_one(model, tok, data, i))
            n_tok = int(data.attention_mask[i].sum())
            n_gen = len(tok(preds[-1], add_special_tokens=False)["input_ids"]) + 1  # + </s> (or the cut-off)
            if setup.kind == "mue":
                st = obj.stats()
                e, d = st["encoder"], st["decoder"]
                enc_run += e["image"]["run"] + e["text"]["run"]
                enc_all += e["image"]["layer_tokens"] + e["text"]["layer_tokens"]
                dec_run, dec_all = dec_run + d["run"], dec_all + d["layer_tokens"]
            elif setup.kind == "truncate":
                enc_run += n_tok * setup.params["enc"]
                enc_all += n_tok * n_enc
                dec_run += n_gen * setup.params["dec"]
                dec_all += n_gen * n_dec
            else:
                enc_run, enc_all = enc_run + n_tok * n_enc, enc_all + n_tok * n_enc
        if setup.kind == "calm":
            dec_run, dec_all = obj.run, obj.layer_tokens
        elif setup.kind == "plain":
            dec_run = dec_all = 1.0
    acc = D.score(preds, data)
    ref = plain_preds if plain_preds is not None else preds
    # paired timing over chunks: unmodified and the config on the same strips, interleaved (mmskip.timing)
    t, dec_plain, dec_cfg, strips = _paired_chunks(model, tok, setup, data, args.repeats)
    ratios = [c / b for b, c in zip(t.baseline_s, t.candidate_s, strict=True)]
    dec_ratios = [c / b for b, c in zip(dec_plain, dec_cfg, strict=True)]
    base = args.plain_acc if args.plain_acc is not None else acc["all"]
    row = {
        "config": setup.name, "kind": setup.kind, "params": setup.params,
        **{f"em_{k}": v for k, v in acc.items() if k != "bleu"}, "bleu": acc["bleu"],
        "em_all_se": math.sqrt(max(acc["all"] * (1 - acc["all"]), 1e-12) / len(data)),
        "agree_unmodified": sum(p == q for p, q in zip(preds, ref, strict=True)) / len(data),
        "acc_relative": acc["all"] / base if base else None,  # undefined when the unmodified model scores 0
        "encoder_layer_tokens": enc_run / enc_all if enc_all else 1.0,
        "decoder_layer_tokens": dec_run / dec_all if dec_all else 1.0,
        "decode_time_fraction": statistics.median(ratios),
        "decode_time_fraction_spread": list(harness.Timing(t.candidate_s, t.baseline_s).spread),
        "speedup": t.speedup, "speedup_spread": list(t.spread), "pairs": t.pairs,
        "decoder_time_fraction": statistics.median(dec_ratios),
        "ms_per_strip_config": 1000 * sum(t.candidate_s) / strips,
        "ms_per_strip_unmodified": 1000 * sum(t.baseline_s) / strips,
    }
    row["goal_met"] = bool(row["decode_time_fraction"] <= 0.6 and (row["acc_relative"] or 0.0) >= 0.97)
    row["preds"] = preds
    print(f"{setup.name:<32} EM {acc['all']:.3f}  dec layer-tokens {row['decoder_layer_tokens']:.3f}  "
          f"decode time x{row['decode_time_fraction']:.3f}", flush=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    p = harness.arguments(__doc__, repeats=1, threads=None,
                          smoke=f"seconds: {SMOKE_MODEL}, 1 strip per task, 5 configs, 1 round")
    p.add_argument("--model", default="digits-florence", help="zoo name or from_pretrained folder")
    p.add_argument("--n", type=int, default=50, help="held-out strips per task")
    p.add_argument("--family", choices=("florence2", "t5gemma2"), default="florence2",
                   help="t5gemma2: a random T5Gemma 2 (speed and FLOPs only; --model and --n do not apply)")
    p.add_argument("--prompts", type=int, default=8, help="t5gemma2: random prompts per timed round")
    args = p.parse_args(argv)
    if args.family == "t5gemma2":
        return _t5gemma2(args)
    if args.smoke:
        args.n, args.repeats = 1, 1
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model, tok = build_model(args.model, args.smoke)
    text = model.model.language_model
    n_enc, n_dec = len(text.encoder.layers), len(text.decoder.layers)
    data = D.heldout_set(tok, n_per_task=args.n)
    with torch.no_grad():  # warm-up
        for i in range(min(4, len(data))):
            generate_one(model, tok, data, i)
    setups = configs(n_enc, n_dec, args.smoke)
    args.plain_acc = None
    rows = [run_config(model, tok, setups[0], data, None, args, n_enc, n_dec)]
    args.plain_acc = rows[0]["em_all"]
    plain_preds = rows[0]["preds"]
    rows += [run_config(model, tok, s, data, plain_preds, args, n_enc, n_dec) for s in setups[1:]]
    meta = {
        "model": SMOKE_MODEL if args.smoke else args.model, "n_per_task": args.n, "items": len(data),
        "repeats": args.repeats, "threads": 1, "encoder_layers": n_enc, "decoder_layers": n_dec,
        "max_new_tokens": MAX_NEW_TOKENS, "torch": torch.__version__,
        "machine": harness.machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    table = _table(rows, meta)
    print("\n" + table)
    res = {"meta": meta, "rows": rows}
    if args.smoke and not args.out:
        return res
    harness.write(args.out or harness.RESULTS / "mue.json", res, table + "\n" + NOTES,
                  lambda png: _plot(rows, meta, png))
    return res


def _t5gemma2(args) -> dict:
    import _mue_t5gemma2 as T5G

    torch.set_num_threads(1)
    res = T5G.run(args)
    table = T5G.table(res)
    print("\n" + table)
    if not (args.smoke and not args.out):
        harness.write(args.out or harness.RESULTS / "mue_t5gemma2.json", res, table + "\n" + T5G.NOTES)
    return res


NOTES = """
Exact match (EM): greedy output == target string; BLEU-4 on the captions (torchmetrics). rel. EM = EM /
the unmodified model's. Layer-tokens: computations run / the unmodified model's (encoder: image + text tokens
x layers, MuE's from `handle.stats()`; decoder: generated tokens x layers). Time: median over paired chunk
runs (unmodified, then config, 10 strips each, batch 1, 1 thread) of config / unmodified; decode = the whole
`generate` call, decoder = inside the BART decoder's forward calls. Goal (issue 10): decode time <= 0.60 at
rel. EM >= 0.97. Truncation and the CALM exit are peers implemented in the benchmark with hooks.
"""


def _table(rows: list[dict], meta: dict) -> str:
    lines = [
        f"{meta['model']}: {meta['items']} held-out strips ({meta['n_per_task']} per task), greedy, batch 1, up to "
        f"{meta['max_new_tokens']} new tokens; {meta['encoder_layers']}+{meta['decoder_layers']} layers; CPU 1 thread, "
        f"{meta['repeats']} round(s) of paired chunk timings; unmodified "
        f"{rows[0]['ms_per_strip_unmodified']:.1f} ms per strip. 1 s.e. of EM all <= "
        f"{max(r['em_all_se'] for r in rows):.3f}",
        "",
        "| config | EM caption / sum / count / position | EM all (rel.) | BLEU | agree | enc / dec layer-tokens "
        "| decode time | decoder time | goal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for r in rows:
        bleu = f"{r['bleu']:.3f}" if r["bleu"] is not None else "n/a"
        rel = f"{r['acc_relative']:.3f}" if r["acc_relative"] is not None else "n/a"
        lines.append(
            f"| {r['config']} | {r['em_caption']:.2f} / {r['em_sum']:.2f} / {r['em_count']:.2f} / "
            f"{r['em_position']:.2f} | {r['em_all']:.3f} ({rel}) | {bleu} | "
            f"{r['agree_unmodified']:.2f} | {r['encoder_layer_tokens']:.3f} / {r['decoder_layer_tokens']:.3f} | "
            f"{r['decode_time_fraction']:.3f} | {r['decoder_time_fraction']:.3f} | {'yes' if r['goal_met'] else '-'} |")
    return "\n".join(lines)


def _plot(rows: list[dict], meta: dict, path: Path) -> None:
    fig = harness.figure(figsize=(12, 5))
    markers = {"plain": "*", "mue": "o", "truncate": "s", "calm": "^"}
    for j, (key, label) in enumerate((("decode_time_fraction", "decode time (generate) / unmodified"),
                                      ("decoder_layer_tokens", "decoder layer-tokens / unmodified"))):
        ax = fig.add_subplot(1, 2, j + 1)
        for kind in markers:
            rs = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r[key])
            if rs:
                ax.plot([r[key] for r in rs], [r["em_all"] for r in rs], marker=markers[kind], ms=8, ls="",
                        label={"plain": "unmodified", "mue": "MuE", "truncate": "static truncation",
                               "calm": "CALM confidence"}[kind])
        base = rows[0]["em_all"]
        ax.axhline(0.97 * base, color="grey", ls=":", lw=1, label="97 % of unmodified")
        if j == 0:
            ax.axvline(0.6, color="grey", ls="--", lw=1, label="-40 % time")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out exact match (all tasks)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"{meta['model']}: MuE vs static truncation vs CALM, {meta['items']} strips")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
