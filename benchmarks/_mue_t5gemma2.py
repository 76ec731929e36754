"""MuE on T5Gemma 2 (``benchmarks/mue.py --family t5gemma2``): random weights, speed and FLOPs only.

No trained T5Gemma 2 is in the zoo and the hub is out of reach, so this part builds a random
T5Gemma 2 from a config (``SIZES``: SigLIP tower + encoder + decoder, default init; the zero-init
image projector redrawn so image tokens differ) and feeds it random prompts (BOS, the image tokens,
random text, EOS; one random image each). What it can say: how much of ``generate``'s time MuE's
exits save at a given share of layer-tokens skipped, and the FLOPs bound (``handle.stats()``);
token agreement with the unmodified model is printed to show the exits change the output, and says
nothing about quality (random weights have none). Peers: static truncation of the decoder (the
same layer lists cut for the run). Greedy, batch 1, a fixed number of new tokens (no EOS).
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Any

import harness
import torch
from mmskip.vision.adapters import T5Gemma2Adapter
from mmskip.vision.mue import MuEConfig

import mmskip

MODEL = "random T5Gemma 2"
SIZES = {  # name -> (layers each side, width, heads, kv heads, image side, image tokens, text tokens)
    "smoke": (2, 32, 2, 1, 16, 4, 6),
    "small": (8, 256, 4, 2, 32, 16, 24),
}
NEW_TOKENS = {"smoke": 4, "small": 16}
NOTES = """
Random weights: the times and layer-token fractions are what MuE's exits cost and save on this
architecture; agreement with the unmodified output only shows that the exits change it; there is
no quality figure (no trained T5Gemma 2 here). Time: median over paired rounds (unmodified, then
config, all prompts, batch 1, 1 thread) of config / unmodified, quartiles in brackets; FLOPs
fraction from `handle.stats()` (weight matmuls, LM head included; attention scores excluded).
"""


def build(size: str, seed: int = 0) -> torch.nn.Module:
    from transformers import SiglipVisionConfig, T5Gemma2Config, T5Gemma2ForConditionalGeneration
    from transformers.models.t5gemma2.configuration_t5gemma2 import (
        T5Gemma2DecoderConfig,
        T5Gemma2EncoderConfig,
        T5Gemma2TextConfig,
    )

    layers, d, heads, kv, side, n_image, _ = SIZES[size]
    torch.manual_seed(seed)
    text = dict(vocab_size=1024, hidden_size=d, intermediate_size=4 * d, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, head_dim=d // heads, query_pre_attn_scalar=d // heads,
                sliding_window=64, layer_types=["sliding_attention", "full_attention"] * (layers // 2),
                max_position_embeddings=512, pad_token_id=0, bos_token_id=2, eos_token_id=1,
                dropout_rate=0.0, attention_dropout=0.0)
    vision = SiglipVisionConfig(hidden_size=d // 2, intermediate_size=2 * d, num_hidden_layers=2, num_attention_heads=2,
                                image_size=side, patch_size=4)
    enc = T5Gemma2EncoderConfig(text_config=T5Gemma2TextConfig(**text).to_dict(), vision_config=vision.to_dict(),
                                mm_tokens_per_image=n_image, eoi_token_index=1001, image_token_index=1000)
    cfg = T5Gemma2Config(encoder=enc.to_dict(), decoder=T5Gemma2DecoderConfig(**text).to_dict(),
                         image_token_index=1000, eoi_token_index=1001)
    cfg._attn_implementation = "sdpa"
    model = T5Gemma2ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        model.model.encoder.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.02)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def prompts(size: str, n: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    _, _, _, _, side, n_image, n_text = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = [2] + [1000] * n_image + torch.randint(3, 1000, (n_text,), generator=g).tolist() + [1]
        out.append({"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
                    "pixel_values": torch.randn(1, 3, side, side, generator=g)})
    return out


def configs(layers: int, smoke: bool) -> list[tuple[str, str, Any]]:
    """(name, kind, params): thresholds inside the random model's cosine range (decoder layers 2-8 of
    "small": ~0.70, 0.81, 0.86, 0.90, 0.91, 0.92, 0.93; encoder ~0.7-0.94)."""
    rows = [("unmodified", "plain", None)]
    points = ((None, 0.9),) if smoke else ((None, 0.92), (None, 0.9), (None, 0.85), (None, 0.8), (0.9, 0.9),
                                           (0.85, 0.85))
    for enc, dec in points:
        name = f"MuE dec {dec}" if enc is None else f"MuE enc {enc} + dec {dec}"
        rows.append((name, "mue", MuEConfig(image_threshold=enc, text_threshold=enc, decoder_threshold=dec, decay=1.0,
                                            floor=dec, min_layers=1)))
    for k in ((1,) if smoke else (layers // 4, layers // 2)):
        rows.append((f"truncate dec {layers - k}/{layers}", "truncate", layers - k))
    return rows


@contextmanager
def attached(model: torch.nn.Module, kind: str, params: Any):
    """The config on ``model`` for the block: MuE's handle, or the decoder's layer list cut (truncation)."""
    if kind == "mue":
        with mmskip.applied(model, params) as handle:
            yield handle
    elif kind == "truncate":
        dec = mmskip.registry.get_adapter(model, "encdec-vlm").decoder
        full = dec.layers
        dec.layers = torch.nn.ModuleList(list(full)[:params])
        try:
            yield None
        finally:
            dec.layers = full
    else:
        yield None


def _generate(model: torch.nn.Module, batch: dict, new: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=new, min_new_tokens=new, do_sample=False)[0, 1:]


def _timed(model: torch.nn.Module, batches: list[dict], new: int, kind: str, params: Any,
           repeats: int) -> dict[str, Any]:
    """Paired rounds: every prompt unmodified, then with the config (attached untimed around its call)."""
    held: dict[str, Any] = {}

    def setup() -> None:
        held["cm"] = attached(model, kind, params)
        held["cm"].__enter__()

    def calls() -> None:
        for b in batches:
            _generate(model, b, new)

    cand = harness.Candidate(calls, setup, lambda: held.pop("cm").__exit__(None, None, None))
    t = harness.paired(calls, {"cfg": cand}, repeats=repeats, warmup=1)["cfg"]
    ratios = [c / b for b, c in zip(t.baseline_s, t.candidate_s, strict=True)]
    return {"time_fraction": statistics.median(ratios),
            "time_fraction_spread": list(harness.Timing(t.candidate_s, t.baseline_s).spread),
            "ms_per_prompt_unmodified": 1000 * statistics.median(t.baseline_s) / len(batches)}


def run(args: Any) -> dict[str, Any]:
    """Every config on ``args.n`` random prompts: agreement, layer-token and FLOPs fractions, paired time."""
    size = "smoke" if args.smoke else "small"
    t0 = time.perf_counter()
    model, batches, new = build(size), prompts(size, 2 if args.smoke else args.prompts), NEW_TOKENS[size]
    adapter = mmskip.registry.get_adapter(model, "encdec-vlm")
    assert isinstance(adapter, T5Gemma2Adapter)
    L = adapter.num_decoder_layers
    ref = [_generate(model, b, new) for b in batches]  # also the warm-up
    rows = []
    for name, kind, params in configs(L, args.smoke):
        with attached(model, kind, params) as handle:
            outs = [_generate(model, b, new) for b in batches]
            stats = handle.stats() if handle is not None else None
        agree = sum(int((o == r).sum()) for o, r in zip(outs, ref, strict=True)) / sum(r.numel() for r in ref)
        if kind == "mue":
            items = stats["items"]
            enc = [v for k, v in items.items() if k.startswith("encoder.") and not k.endswith(".kv")]
            dec = [v for k, v in items.items() if k.startswith("decoder.") and not k.endswith(".kv")]
            frac = {p: sum(v["executed"] for v in vs) / sum(v["executed"] + v["skipped"] for v in vs)
                    for p, vs in (("enc", enc), ("dec", dec))}
            flops = stats["flops_fraction"]
        else:
            frac = {"enc": 1.0, "dec": params / L if kind == "truncate" else 1.0}
            flops = None
        row = {"config": name, "kind": kind, "agree_unmodified": agree, "encoder_layer_tokens": frac["enc"],
               "decoder_layer_tokens": frac["dec"], "flops_fraction": flops}
        if kind != "plain":
            row.update(_timed(model, batches, new, kind, params, max(3, args.repeats)))
        rows.append(row)
        print(f"{name:<28} dec layer-tokens {row['decoder_layer_tokens']:.3f}  "
              f"time x{row.get('time_fraction', 1.0):.3f}  agree {agree:.2f}", flush=True)
    layers, d = SIZES[size][:2]
    meta = {"model": f"{MODEL} ({layers}+{layers} layers, d={d})", "weights": "random", "prompts": len(batches),
            "new_tokens": new, "repeats": max(3, args.repeats), "threads": 1, "torch": torch.__version__,
            "machine": harness.machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "seconds": round(time.perf_counter() - t0, 1)}
    return {"meta": meta, "rows": rows}


def table(res: dict[str, Any]) -> str:
    meta, rows = res["meta"], res["rows"]
    base = next((r["ms_per_prompt_unmodified"] for r in rows if "ms_per_prompt_unmodified" in r), float("nan"))
    lines = [f"{meta['model']}, **random weights: speed and FLOPs only, not quality**; {meta['prompts']} random "
             f"prompts, greedy, batch 1, {meta['new_tokens']} new tokens; CPU 1 thread, {meta['repeats']} paired "
             f"rounds; unmodified {base:.1f} ms per prompt.", "",
             "| config | agree (not quality) | enc / dec layer-tokens | FLOPs fraction | generate time |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        flops = f"{r['flops_fraction']:.3f}" if r["flops_fraction"] is not None else "-"
        if "time_fraction" in r:
            lo, hi = r["time_fraction_spread"]
            t = f"{r['time_fraction']:.3f} ({lo:.3f}-{hi:.3f})"
        else:
            t = "1"
        lines.append(f"| {r['config']} | {r['agree_unmodified']:.2f} | {r['encoder_layer_tokens']:.3f} / "
                     f"{r['decoder_layer_tokens']:.3f} | {flops} | {t} |")
    return "\n".join(lines)
