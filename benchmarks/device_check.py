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

import dataclasses
import statistics
import time

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


@torch.no_grad()
def check_lm(name: str, device: torch.device, dtype: torch.dtype, new_tokens: int, repeats: int) -> list[dict]:
    model, ids = _lm(name, device, dtype)
    ref_logits = model(input_ids=ids).logits

    def gen() -> tuple[float, torch.Tensor]:
        harness.sync()
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
        harness.sync()
        return time.perf_counter() - t0, out[0, ids.shape[1]:]

    gen()  # warm-up
    rows = []
    for label, config in _configs().items():
        with mmskip.applied(model, config) as handle:
            gen()  # warm-up; SWIFT searches its layer set here
            found = handle.stats().get("layer_set")
        if found:  # time SWIFT with the layer set it found (set reuse), not the search
            config = dataclasses.replace(config, attn_skip=tuple(found["attn_skip"]), mlp_skip=tuple(found["mlp_skip"]))
        ratios, spent = [], {}
        for _ in range(repeats):  # paired: plain, then the technique, back to back, so drift cancels
            t_plain, plain = gen()
            with mmskip.applied(model, config) as handle:
                t_skip, skipped = gen()
                spent = handle.stats()
            ratios.append(t_plain / t_skip)
        exact = bool(torch.equal(ref_logits, model(input_ids=ids).logits))
        frac = spent.get("flops_fraction") or 1.0
        rows.append({
            "model": name, "config": label, "speedup": statistics.median(ratios), "bound": 1.0 / frac,
            "agreement": float((plain == skipped).float().mean()), "identical": bool(torch.equal(plain, skipped)),
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
    pipe.set_progress_bar_config(disable=True)
    labels = [i % 10 for i in range(batch)]

    def run() -> tuple[float, torch.Tensor]:
        g = torch.Generator(device).manual_seed(0)
        harness.sync()
        t0 = time.perf_counter()
        out = pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=4.0, generator=g, output_type="pt")
        harness.sync()
        return time.perf_counter() - t0, out.images.float().cpu()

    run()
    ratios = []
    config = FeatureInheritanceConfig(schedule=schedules.interval(3))
    for _ in range(repeats):
        pipe.disable_skip()
        t_plain, plain = run()
        pipe.enable_skip(config)
        t_skip, skipped = run()
        ratios.append(t_plain / t_skip)
    stats = pipe.skip_stats()
    pipe.disable_skip()
    _, again = run()
    row = {"model": "digits-dit", "config": "inheritance every 3", "speedup": statistics.median(ratios),
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
    new_tokens, repeats, steps, batch = (8, 1, 4, 2) if args.smoke else (64, 5, 50, 64)
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
