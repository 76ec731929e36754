"""Every technique on one device and dtype: it runs, `remove()` is exact, and what it buys there.

    python benchmarks/device_check.py                 # CUDA + bfloat16 when a GPU is present, else CPU float32
    python benchmarks/device_check.py --smoke         # seconds: few tokens, few steps

Language side (zoo ``stdlib-lm`` and a 24-layer d=512 random Llama, batch 1, greedy): plain
``generate`` vs each LLM technique: decode speedup (median of paired runs), FLOPs bound from
``handle.stats()``, agreement of the generated tokens with plain decoding (SWIFT must be
identical), and whether the logits after ``remove()`` equal the logits before ``apply``.
Diffusion side (zoo ``digits-dit``, DDIM-50, CFG 4): feature inheritance every 3 steps vs
the plain pipeline, PSNR to the plain images, and equality after ``disable_skip()``.
Writes ``benchmarks/results/device_check_<device>.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable

import harness
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mmskip
from mmskip import schedules


def _lm(name: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.Tensor]:
    if name == "random-24x512":
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=24,
                          num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
                          pad_token_id=0, bos_token_id=None, eos_token_id=None)
        model = LlamaForCausalLM(cfg)
        ids = torch.randint(3, 32000, (1, 32), generator=torch.Generator().manual_seed(0))
    else:
        from mmskip.zoo.stdlib_data import read_texts

        model, tok = mmskip.zoo.load(name)
        ids = torch.tensor([next(t for t in (tok(x).input_ids for x in read_texts("test")) if len(t) >= 32)[:32]])
    return model.to(device=device, dtype=dtype).eval(), ids.to(device)


def _configs() -> dict[str, mmskip.SkipConfig]:
    return {
        "unified s=2": mmskip.LayerSkipConfig(schedule=schedules.unified(2.0)),
        "ffn-skip 25% (forced)": mmskip.FFNSkipConfig(schedule=schedules.adaptive(-1.0, "cosine", warmup=0,
                                                                                   max_skip=0.25)),
        "void layers": mmskip.VoidLayerConfig(),
        "SWIFT r=0.2": mmskip.SelfSpeculativeConfig(skip_ratio=0.2, confidence=0.3, max_draft=4),
    }


def _paired_on_copy(model: torch.nn.Module, config: mmskip.SkipConfig, gen: Callable[[torch.nn.Module], torch.Tensor],
                    repeats: int) -> tuple[harness.Timing, torch.Tensor, torch.Tensor, dict]:
    """Time ``gen(model)`` against ``gen(copy with config applied)`` in paired, interleaved rounds; the copy is
    made and applied once, so applying is not timed. Returns the timing, both outputs and the last call's stats."""
    twin, got = copy.deepcopy(model), {}
    with mmskip.applied(twin, config) as handle:

        def plain() -> None:
            got["plain"] = gen(model)

        def skip() -> None:
            handle.reset_stats()  # the stats of the last call
            got["skipped"] = gen(twin)

        timing = harness.paired(plain, {"skip": skip}, repeats=repeats)["skip"]
        return timing, got["plain"], got["skipped"], handle.stats()


@torch.no_grad()
def check_lm(name: str, device: torch.device, dtype: torch.dtype, new_tokens: int, repeats: int) -> list[dict]:
    model, ids = _lm(name, device, dtype)
    ref_logits = model(input_ids=ids).logits

    def gen(m: torch.nn.Module) -> torch.Tensor:
        out = m.generate(input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0)
        return out[0, ids.shape[1]:]

    gen(model)  # warm-up
    rows = []
    for label, config in _configs().items():
        with mmskip.applied(model, config) as handle:
            gen(model)  # warm-up; SWIFT searches its layer set here
            found = handle.stats().get("layer_set")
        if found:  # time SWIFT with the layer set it found (set reuse), not the search
            config = dataclasses.replace(config, attn_skip=tuple(found["attn_skip"]), mlp_skip=tuple(found["mlp_skip"]))
        timing, plain_out, skipped, spent = _paired_on_copy(model, config, gen, repeats)
        exact = bool(torch.equal(ref_logits, model(input_ids=ids).logits))
        frac = spent.get("flops_fraction") or 1.0
        rows.append({
            "model": name, "config": label, "speedup": timing.speedup, "spread": list(timing.spread),
            "bound": 1.0 / frac, "agreement": float((plain_out == skipped).float().mean()),
            "identical": bool(torch.equal(plain_out, skipped)),
            "remove_exact": exact,
        })
        print(f"| {name} | {label} | {rows[-1]['speedup']:.2f}x | {rows[-1]['bound']:.2f}x | "
              f"{rows[-1]['agreement']:.2f} | {rows[-1]['identical']} | {exact} |", flush=True)
    return rows


@torch.no_grad()
def check_dit(device: torch.device, dtype: torch.dtype, steps: int, batch: int, repeats: int) -> dict:
    from mmskip.diffusion import FeatureInheritanceConfig
    from mmskip.pipelines import SkipDiTPipeline

    from mmskip.eval import psnr

    pipe = SkipDiTPipeline.from_pretrained(mmskip.zoo.path("digits-dit"), dtype=dtype).to(device)
    skip_pipe = SkipDiTPipeline.from_pretrained(mmskip.zoo.path("digits-dit"), dtype=dtype).to(device)
    labels = [i % 10 for i in range(batch)]
    got: dict[str, torch.Tensor] = {}

    def run(p: SkipDiTPipeline, key: str) -> None:
        g = torch.Generator(device).manual_seed(0)
        out = p(class_labels=labels, num_inference_steps=steps, guidance_scale=4.0, generator=g, output_type="pt")
        got[key] = out.images.float().cpu()

    for p in (pipe, skip_pipe):
        p.set_progress_bar_config(disable=True)
    skip_pipe.enable_skip(FeatureInheritanceConfig(schedule=schedules.interval(3)))  # once: enabling is not timed
    timing = harness.paired(lambda: run(pipe, "plain"), {"fi": lambda: run(skip_pipe, "skipped")}, repeats=repeats)["fi"]
    plain, skipped = got["plain"], got["skipped"]
    stats = skip_pipe.skip_stats()
    skip_pipe.disable_skip()
    run(skip_pipe, "again")
    again = got["again"]
    row = {"model": "digits-dit", "config": "inheritance every 3", "speedup": timing.speedup, "spread": list(timing.spread),
           "bound": 1.0 / (stats.get("flops_fraction") or 1.0), "psnr_db": float(psnr(skipped, plain)),
           "disable_exact": bool(torch.equal(again, plain))}
    print(f"| digits-dit | inheritance every 3 | {row['speedup']:.2f}x | {row['bound']:.2f}x | "
          f"PSNR {row['psnr_db']:.1f} dB | | {row['disable_exact']} |", flush=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    p = harness.arguments(__doc__, repeats=None, threads=None, device=True,
                          smoke="a few tokens and steps, to check the script runs")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    new_tokens, repeats, steps, batch = (8, 3, 4, 2) if args.smoke else (64, 5, 50, 64)
    name = harness.machine(device)
    print(f"{name}, {dtype}, mmskip {mmskip.__version__}, torch {torch.__version__}")
    print("| model | config | speedup | FLOPs bound | agreement / PSNR | identical | remove() exact |")
    print("|---|---|---:|---:|---:|---|---|")
    rows = []
    for lm in ("stdlib-lm",) if args.smoke else ("stdlib-lm", "random-24x512"):
        rows += check_lm(lm, device, dtype, new_tokens, repeats)
    rows.append(check_dit(device, dtype, steps, batch, repeats))
    meta = {"device": name, "dtype": str(dtype), "torch": torch.__version__, "smoke": args.smoke,
            "new_tokens": new_tokens, "repeats": repeats, "dit_steps": steps, "dit_batch": batch,
            "date": time.strftime("%Y-%m-%d")}
    out = args.out or harness.RESULTS / f"device_check_{device.type}{'_smoke' if args.smoke else ''}.json"
    harness.write(out, {"meta": meta, "rows": rows}, indent=2)
    return {"meta": meta, "rows": rows}


if __name__ == "__main__":
    main()
