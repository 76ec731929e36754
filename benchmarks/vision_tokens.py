"""Vision-token skipping on ``digits-llava``: accuracy vs prefill FLOPs, KV bytes, prefill time (#9 item 6).

    python benchmarks/vision_tokens.py                                # zoo digits-llava, 100 per type
    python benchmarks/vision_tokens.py --model runs/zoo/digits-llava  # any from_pretrained folder
    python benchmarks/vision_tokens.py --smoke                        # seconds: tiny random LLaVA

Configs: the unmodified model; ``mmskip.vision.MoDConfig`` (p-MoD) with PRD (``progressive()``) and with a
steeper explicit schedule, each with the ``"attention"`` and ``"norm"`` signals; and peers implemented here
with hooks (baselines, not library techniques):

* **FastV**: layers ``0..K-1`` run in full; at layer ``K`` the vision tokens are ranked *once* by the
  attention the last prompt token pays them in layer ``K-1`` (softmax over valid keys, mean over heads,
  from layer ``K-1``'s own q/k projections of its input: FastV's ``last_layer_attention``), and the top
  ``trunc(n_vision * r)`` are kept for every later layer; the others are dropped (not in any later
  layer's attention or KV cache). Built on MoDConfig's packing with ``explicit([1]*K + [r]*(L-K))`` and its
  ranking replaced by that one score, so the kept set is the same in every layer >= K. ``r`` is chosen so
  that the kept vision tokens summed over layers match the p-MoD config it is compared with.
* **random**: the p-MoD config's per-layer keep counts, with tokens ranked by one seeded random score per
  token and prefill (shared by all layers, so with a decreasing schedule a dropped token stays dropped).
  MoDConfig has no random signal: the ranking is replaced on the applied layer hooks (zero signal FLOPs).
* **pool 2x2**: a forward hook on the multimodal projector average-pools its 8x8 grid of image features 2x2
  (64 -> 16 tokens; on digits-llava one token per digit cell) and prompts carry 16 ``<image>`` tokens.

Measured per config, on the held-out questions (the first N of each type of the recipe's held-out set):

* accuracy: argmax of the prefill's last logits == the one-token answer, per question type and overall;
* prefill FLOPs: *predicted* = ``handle.stats()["prefill_flops_fraction"]`` (decoder layers' weight matmuls
  plus the signal's cost; for pooling ``tokens / tokens of the plain prompt``); *measured* =
  ``torch.utils.flop_counter.FlopCounterMode`` over one batch-16 prefill, the FLOPs counted inside the
  language model's decoder layers, / the same for the unmodified model (on CPU FlopCounterMode does not
  count sdpa's attention-score FLOPs, neither does the prediction); in the JSON also
  ``flops_eager_measured`` (the same with eager attention: attention scores and values counted) and
  ``flops_model_measured`` (the whole forward: vision tower, projector, LM head on the last token);
* KV bytes: predicted ``kv_fraction`` from the stats vs measured = the bytes of every layer's cached K and V
  after that prefill / the unmodified model's;
* prefill time: ``--repeats`` interleaved pairs (``mmskip.timing.paired``: unmodified and config, the
  config applied once on a copy) of a batch-16 prefill with ``torch.set_num_threads(1)``; speedup =
  median over pairs of ``t_plain / t_config``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import NamedTuple

import harness
import torch
from _token_meters import eager_layer_flops, kv_per_token, layer_flops, paired_prefill, prefill
from _token_peers import fastv_ranking, pool_2x2, random_ranking
from mmskip.vision import MoDConfig

import mmskip
from mmskip import schedules
from mmskip.registry import get_adapter
from mmskip.zoo import llava_data as D

SMOKE_MODEL = "tiny-random-llava"
FASTV_K = 2
STEEP_FASTV_K = 1


# -- model and data ------------------------------------------------------------------------------


def tiny_llava(layers: int = 4, hidden: int = 64, seed: int = 0):
    """A random LLaVA with digits-llava's shapes where it matters (32x32 images, patch 4 -> 64 vision
    tokens, the word-level tokenizer's vocabulary, ``<image>`` id 4), small everywhere else."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = D.build_tokenizer()
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=D.IMAGE_SIZE,
        patch_size=D.PATCH,
        projection_dim=32,
    )
    text = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        eos_token_id=None,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids(D.IMAGE_TOKEN),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=D.N_IMAGE_TOKENS,
    )
    cfg._attn_implementation = "sdpa"
    return LlavaForConditionalGeneration(cfg).eval(), tok


def build_model(name: str):
    """``(model, tokenizer)``: the smoke model, a ``from_pretrained`` folder or a zoo name."""
    if name == SMOKE_MODEL:
        return tiny_llava()
    if Path(name).is_dir():
        from mmskip.zoo.loaders import load_llava

        model, tok = load_llava(Path(name))
        return model.eval(), tok
    from mmskip import zoo

    model, tok = zoo.load(name)
    return model.eval(), tok


def questions(tok, n_per_type: int) -> D.Batch:
    """The first ``n_per_type`` questions of each type of the recipe's held-out set (seed 1234)."""
    full = D.heldout_set(tok, max(n_per_type, 500))
    pick = [i for t in D.QTYPES for i in [j for j, q in enumerate(full.qtypes) if q == t][:n_per_type]]
    return D.Batch(
        full.pixel_values[pick],
        full.input_ids[pick],
        full.attention_mask[pick],
        full.labels[pick],
        full.answer_pos[pick],
        [full.qtypes[i] for i in pick],
        [full.questions[i] for i in pick],
        [full.answers[i] for i in pick],
    )


def inputs(tok, batch: D.Batch, idx: list[int], n_image: int) -> dict[str, torch.Tensor]:
    """Left-padded prefill inputs for rows ``idx``; prompts carry ``n_image`` ``<image>`` tokens."""
    texts = [
        D.prompt_text(batch.questions[i]).replace(D.IMAGE_TOKEN * D.N_IMAGE_TOKENS, D.IMAGE_TOKEN * n_image)
        for i in idx
    ]
    enc = tok(texts, padding=True, return_tensors="pt")
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "pixel_values": batch.pixel_values[idx],
    }


# -- configs -------------------------------------------------------------------------------------


def steep_ratios(num_layers: int) -> tuple[float, ...]:
    """A harsher schedule than PRD (saves >= 45 % of the decoder's prefill FLOPs on digits-llava):
    layer 0 full, then 0.35 decaying by 0.75 per layer, floored at 0.1."""
    return (1.0,) + tuple(max(0.1, 0.35 * 0.75 ** (i - 1)) for i in range(1, num_layers))


def kept_counts(ratios: tuple[float, ...], n_vision: int) -> list[int]:
    return [n_vision if r >= 1.0 else int(n_vision * r) for r in ratios]


def matched_ratio(ratios: tuple[float, ...], n_vision: int, k: int) -> float:
    """FastV keep ratio after layer ``k`` keeping as many vision tokens, summed over layers, as ``ratios``."""
    total = sum(kept_counts(ratios, n_vision)) - k * n_vision
    keep = max(1, min(n_vision - 1, round(total / (len(ratios) - k))))
    return (keep + 0.5) / n_vision  # trunc(n_vision * ratio) == keep


class Setup(NamedTuple):
    name: str
    signal: str  # what the table shows
    kind: str  # plain | mod | fastv | random | pool
    ratios: tuple[float, ...] | None = None
    k: int = 0  # FastV: first layer that drops
    mod_signal: str = "attention"


def configs(num_layers: int, n_vision: int) -> list[Setup]:
    prd = schedules.progressive().ratios(num_layers)
    steep = steep_ratios(num_layers)
    fastv = matched_ratio(prd, n_vision, FASTV_K)
    fastv_steep = matched_ratio(steep, n_vision, STEEP_FASTV_K)
    return [
        Setup("unmodified", "-", "plain"),
        Setup("p-MoD PRD", "attention", "mod", prd, mod_signal="attention"),
        Setup("p-MoD PRD", "norm", "mod", prd, mod_signal="norm"),
        Setup("p-MoD steep", "attention", "mod", steep, mod_signal="attention"),
        Setup("p-MoD steep", "norm", "mod", steep, mod_signal="norm"),
        Setup(
            f"FastV K={FASTV_K} R={1 - int(n_vision * fastv) / n_vision:.0%} (~PRD FLOPs)",
            "attention@K-1",
            "fastv",
            (1.0,) * FASTV_K + (fastv,) * (num_layers - FASTV_K),
            k=FASTV_K,
        ),
        Setup("random (PRD counts)", "random", "random", prd),
        Setup(
            f"FastV K={STEEP_FASTV_K} R={1 - int(n_vision * fastv_steep) / n_vision:.0%} (~steep FLOPs)",
            "attention@K-1",
            "fastv",
            (1.0,) * STEEP_FASTV_K + (fastv_steep,) * (num_layers - STEEP_FASTV_K),
            k=STEEP_FASTV_K,
        ),
        Setup("random (steep counts)", "random", "random", steep),
        Setup("pool 2x2 (64 -> 16 tokens)", "-", "pool"),
    ]


class Attached:
    """One config applied to the model (``remove()`` restores it)."""

    def __init__(self, model, setup: Setup, seed: int = 0) -> None:
        self.setup, self.handle, self.torch_hooks = setup, None, []
        self.n_image = D.N_IMAGE_TOKENS
        adapter = get_adapter(model, "vlm")
        if setup.kind == "pool":
            self.n_image = D.N_IMAGE_TOKENS // 4
            self.torch_hooks.append(adapter.mm_model.multi_modal_projector.register_forward_hook(pool_2x2))
        elif setup.kind != "plain":
            schedule = schedules.explicit(ratios=list(setup.ratios))
            self.handle = mmskip.apply(model, MoDConfig(schedule=schedule, signal=setup.mod_signal))
            layers = adapter.text.layers
            hooks = {
                i: layers[i]._diffusers_hook.get_hook(self.handle.hook_name + ".layer")
                for i in self.handle.state.ratios
            }
            if setup.kind == "random":
                random_ranking(hooks, seed)
            elif setup.kind == "fastv":
                self.torch_hooks += fastv_ranking(hooks, layers, setup.k)

    def predicted(self, plain_tokens: int, tokens: int) -> tuple[float, float]:
        """(prefill FLOPs fraction, KV fraction) predicted for the last prefill."""
        if self.handle is None:
            return tokens / plain_tokens, tokens / plain_tokens
        st = self.handle.stats()
        return st["prefill_flops_fraction"], st["kv_fraction"]

    def remove(self) -> None:
        for h in self.torch_hooks:
            h.remove()
        if self.handle is not None:
            self.handle.remove()


# -- measuring -----------------------------------------------------------------------------------


@torch.no_grad()
def accuracy(model, tok, data: D.Batch, n_image: int, batch: int) -> tuple[dict[str, float], list[int]]:
    """Accuracy per question type and ``"all"``, and the predicted token ids."""
    vocab = tok.get_vocab()
    right = {t: [] for t in D.QTYPES}
    preds = []
    for s in range(0, len(data.questions), batch):
        idx = list(range(s, min(s + batch, len(data.questions))))
        pred = prefill(model, inputs(tok, data, idx, n_image)).logits[:, -1].argmax(-1).tolist()
        preds += pred
        for i, p in zip(idx, pred, strict=True):
            right[data.qtypes[i]].append(p == vocab[data.answers[i]])
    acc = {t: sum(v) / len(v) for t, v in right.items() if v}
    acc["all"] = sum(sum(v) for v in right.values()) / sum(len(v) for v in right.values())
    return acc, preds


def run_config(model, tok, setup: Setup, data: D.Batch, probe: list[int], plain: dict, args) -> dict:
    att = Attached(model, setup, seed=args.seed)
    try:
        inp = inputs(tok, data, probe, att.n_image)
        tokens = inp["input_ids"].numel()
        flops, flops_model, kv = layer_flops(model, inp)
        flops_eager = eager_layer_flops(model, inp)
        pred_flops, pred_kv = att.predicted(plain["tokens"], tokens)
        stats = att.handle.stats() if att.handle is not None else None
        nested = same = None
        if att.handle is not None:  # do the kept vision sets shrink layer by layer (dropped stays dropped)?
            st = att.handle.state
            masks = [st.kept_vision_mask(i) for i in sorted(st.records)]
            nested = all(bool((b & ~a).sum() == 0) for a, b in zip(masks, masks[1:]))
            same = all(torch.equal(a, masks[0]) for a in masks)
        acc, preds = accuracy(model, tok, data, att.n_image, args.eval_batch)
    finally:
        att.remove()
    t = paired_prefill(model, plain["inputs"], inp, lambda twin: Attached(twin, setup, seed=args.seed), args.repeats)
    row = {
        "config": setup.name,
        "signal": setup.signal,
        "kind": setup.kind,
        "ratios": list(setup.ratios) if setup.ratios else None,
        "flops_predicted": pred_flops,
        "flops_measured": flops / plain["flops"],
        "flops_model_measured": flops_model / plain["flops_model"],
        "flops_eager_measured": flops_eager / plain["flops_eager"],
        "kv_predicted": pred_kv,
        "kv_measured": kv / plain["kv"],
        "kv_bytes_measured": kv,
        "kv_bytes_predicted": kv_per_token(model) * tokens
        if stats is None
        else stats["kv_bytes_full"] - stats["kv_bytes_saved"],
        "prefill_speedup": t.speedup, "prefill_speedup_spread": list(t.spread), "prefill_pairs": t.pairs,
        "prefill_flops_bound": plain["flops"] / flops if flops else None,
        "prefill_bound_warning": t.bound_warning(flops / plain["flops"]),
        "prefill_s": t.seconds, "prefill_s_plain": t.baseline_seconds,
        **{f"acc_{t}": v for t, v in acc.items()},
        "acc_all_se": math.sqrt(acc["all"] * (1 - acc["all"]) / len(preds)),
        "agree_unmodified": None
        if plain.get("preds") is None
        else sum(a == b for a, b in zip(preds, plain["preds"], strict=True)) / len(preds),
    }
    if setup.kind == "plain":
        plain["preds"], row["agree_unmodified"] = preds, 1.0
    if stats is not None:
        row["kept_sets_nested"], row["kept_sets_identical"] = nested, same
        row["kept_vision_per_layer"] = {int(i): r["kept_vision"] // len(probe) for i, r in stats["layers"].items()}
    row["flops_diff"] = row["flops_measured"] - row["flops_predicted"]
    return row


def main(argv: list[str] | None = None) -> dict:
    p = harness.arguments(__doc__, repeats=7, threads=None,
                          smoke=f"seconds: {SMOKE_MODEL}, 4 questions per type, 3 pairs")
    p.add_argument("--model", default="digits-llava", help="zoo name or from_pretrained folder")
    p.add_argument("--n", type=int, default=100, help="held-out questions per type")
    p.add_argument("--batch", type=int, default=16, help="prefill batch for FLOPs, KV and timing")
    p.add_argument("--eval-batch", type=int, default=50)
    p.add_argument("--seed", type=int, default=0, help="random peer's seed")
    args = p.parse_args(argv)
    if args.smoke:
        args.model = args.model if args.model != "digits-llava" else SMOKE_MODEL
        args.n, args.batch, args.repeats = 4, 4, 3
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model, tok = build_model(args.model)
    adapter = get_adapter(model, "vlm")
    data = questions(tok, args.n)
    # probe batch: question types interleaved (mixed prompt lengths -> left padding, like real batches)
    order = [
        i for trip in zip(*[[j for j, q in enumerate(data.qtypes) if q == t] for t in D.QTYPES]) for i in trip
    ]
    probe = order[: args.batch]
    plain_in = inputs(tok, data, probe, D.N_IMAGE_TOKENS)
    f_in, f_all, kv = layer_flops(model, plain_in)
    plain = {
        "inputs": plain_in,
        "tokens": plain_in["input_ids"].numel(),
        "flops": f_in,
        "flops_model": f_all,
        "kv": kv,
        "flops_eager": eager_layer_flops(model, plain_in),
    }
    setups = configs(adapter.num_layers, D.N_IMAGE_TOKENS)
    for s in setups:  # warm-up
        att = Attached(model, s, seed=args.seed)
        try:
            prefill(model, inputs(tok, data, probe, att.n_image))
        finally:
            att.remove()
    rows = [run_config(model, tok, s, data, probe, plain, args) for s in setups]
    meta = {
        "model": args.model,
        "n_per_type": args.n,
        "probe_batch": len(probe),
        "repeats": args.repeats,
        "threads": 1,
        "num_layers": adapter.num_layers,
        "n_vision": D.N_IMAGE_TOKENS,
        "probe_prompt_tokens": plain["tokens"] // len(probe),
        "torch": torch.__version__,
        "machine": harness.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    table = _table(rows, meta)
    print("\n" + table)
    res = {"meta": meta, "rows": rows}
    if args.smoke and not args.out:
        return res
    out = args.out or harness.RESULTS / "vision_tokens.json"
    harness.write(out, res, table + "\n" + NOTES, lambda png: _plot(rows, meta, png), indent=2)
    return res


NOTES = """
FLOPs: predicted = `handle.stats()["prefill_flops_fraction"]` (decoder layers' weight matmuls + the signal's
cost; pooling: prompt tokens / plain prompt tokens); measured = FlopCounterMode inside the decoder layers over
one prefill of the probe batch, / the unmodified model's (sdpa's attention scores are not counted on CPU;
JSON `flops_eager_measured` counts them, with eager attention; `flops_model_measured` is the whole forward).
KV: predicted `kv_fraction` vs bytes of every layer's cached K/V after that prefill / the unmodified model's.
Speedup: median over interleaved pairs (unmodified and config) of batch-size prefill times, 1 thread, whole forward
(vision tower included). Accuracy: argmax of the prefill's last logits vs the one-token answer.
FastV: layers < K full; at layer K the vision tokens are ranked once by layer K-1's last-token attention
(mean over heads) and the rest dropped for all later layers; R chosen to match the p-MoD config's kept
vision tokens summed over layers. random: the p-MoD config's per-layer counts, one seeded random score per
token (shared by all layers: dropped tokens stay dropped). pool 2x2: projector output average-pooled 2x2
(64 -> 16 vision tokens, one per digit cell), 16 `<image>` tokens in the prompt.
"""


def _table(rows: list[dict], meta: dict) -> str:
    lines = [
        f"{meta['model']}: {meta['n_per_type']} held-out questions per type; FLOPs/KV/time on a batch-"
        f"{meta['probe_batch']} prefill ({meta['probe_prompt_tokens']} tokens, {meta['n_vision']} vision), "
        f"CPU 1 thread, median of {meta['repeats']} pairs. 1 s.e. of acc all: "
        f"±{max(r['acc_all_se'] for r in rows):.3f} or less; agree = same answer token as the unmodified "
        "model",
        "",
        "| config | signal | prefill FLOPs predicted / measured | KV fraction predicted / measured "
        "| prefill speedup "
        "| acc digit / count / sum / all | agree w/ unmodified |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['signal']} | {r['flops_predicted']:.3f} / {r['flops_measured']:.3f} | "
            f"{r['kv_predicted']:.3f} / {r['kv_measured']:.3f} | {r['prefill_speedup']:.2f}x | "
            f"{r['acc_digit']:.2f} / {r['acc_count']:.2f} / {r['acc_sum']:.2f} / {r['acc_all']:.3f} | "
            f"{r['agree_unmodified']:.2f} |"
        )
    return "\n".join(lines)


def _plot(rows: list[dict], meta: dict, path: Path) -> None:
    fig = harness.figure(figsize=(8, 5.5))
    ax = fig.add_subplot()
    markers = {"plain": "*", "mod": "o", "fastv": "s", "random": "x", "pool": "D"}
    for r in rows:
        label = f"{r['config']} ({r['signal']})" if r["signal"] != "-" else r["config"]
        ax.scatter(r["flops_measured"], r["acc_all"], marker=markers[r["kind"]], s=70, label=label)
    ax.set_xlabel("prefill FLOPs fraction (decoder layers, measured)")
    ax.set_ylabel("held-out accuracy (all question types)")
    ax.set_title(f"{meta['model']}: vision-token skipping, {meta['n_per_type']} questions per type")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
