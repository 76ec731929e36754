"""The main job: every mmskip technique on the zoo's trained models, speed beside quality.

    bash run.sh demo            # what README's first command runs
    python apps/demo.py --out runs/demo
    python apps/demo.py --only language --new-tokens 8 --repeats 3   # quick check, seconds

1. Language (``stdlib-lm``, trained without skipping, and ``stdlib-lm-skip``, trained for it):
   Unified Layer Skipping, FFN-SkipLLM and LAC void layers, decode speedup and FLOPs bound beside
   agreement with the full model (``language_demo``); SWIFT and early-exit self-speculation,
   lossless, against plain decoding (``speculative_demo``).
2. Diffusion (``digits-dit``, ``digits-sd``): drop-in ``SkipDiTPipeline`` /
   ``SkipStableDiffusionPipeline`` with feature inheritance (A-SDM), against the same sampler
   with fewer steps, each with speedup, PSNR to the full 50-step output and the accuracy of
   the zoo classifier on the requested digits. A PNG grid per pipeline is written to ``--out``.
3. Vision (``digits-llava``, ``digits-video``, ``digits-florence``): p-MoD, VideoLLM-MoD (one pass
   and streamed clip by clip) and MuE early exits, accuracy beside the fraction of the prefill /
   decoder work that ran and the KV cache kept (``vision_demo``).

Speedups are paired against the unmodified model in this run (``mmskip.timing.paired``: ``--repeats``
interleaved rounds after a warm-up round, the median ratio with its quartiles, and the FLOPs bound
beside it; a line warns when a speedup beats its bound by more than its spread allows);
``benchmarks/`` has the full comparisons with peers, FID and CLIP score.

4. Summary: ``mmskip.tune`` on each language and diffusion model (``--tune-budget`` each), the
   best held-out speedup at each quality level from the tuned fronts (``demo_tune.py``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from mmskip.diffusion import FeatureInheritanceConfig, nonuniform
from mmskip.pipelines import SkipDiTPipeline, SkipStableDiffusionPipeline

import mmskip
from mmskip import schedules, zoo
from mmskip.eval import conditional_accuracy, psnr
from mmskip.eval.decode_agreement import decode_agreement
from mmskip.eval.lm import load_lm
from mmskip.timing import Timing, paired
from mmskip.zoo.data import caption

# no trailing whitespace: the tokenizer learned a newline and the next line's indent as one token,
# so a prompt ending in "\n" or " " asks for a continuation the model never saw in training
_PROMPTS = [
    "import os\n\n\ndef read_lines(path):",
    "class Stack:\n    def __init__(self):",
    "def parse_args(argv=None):\n    parser =",
    "    for key, value in sorted(",
]


def _lm_configs() -> dict[str, mmskip.SkipConfig | None]:
    return {
        "full model": None,
        "Unified Layer Skipping s=1.5": mmskip.LayerSkipConfig(schedule=schedules.unified(1.5)),
        "Unified Layer Skipping s=2": mmskip.LayerSkipConfig(schedule=schedules.unified(2.0)),
        "FFN-SkipLLM (<=25% of FFNs)": mmskip.FFNSkipConfig(),
        "void layers (LAC, alpha=0.5)": mmskip.VoidLayerConfig(),
    }


def _speed(t: Timing | None, flops_fraction: float | None) -> dict[str, Any]:
    """A row's speed fields: the median paired speedup, its quartiles and the bound warning, if any
    (``t`` None: the baseline itself)."""
    if t is None:
        return {"speedup": 1.0, "spread": [1.0, 1.0], "pairs": None, "bound_warning": None}
    lo, hi = t.spread
    return {"speedup": t.speedup, "spread": [lo, hi], "pairs": t.pairs, "bound_warning": t.bound_warning(flops_fraction)}


def _spread(r: dict) -> str:
    lo, hi = r["spread"]
    return f"{lo:.2f}-{hi:.2f}"


def _warn(r: dict) -> None:
    if r.get("bound_warning"):
        print(f"{'':4s}! {r['bound_warning']}")


@torch.no_grad()
def language_demo(model_name: str = "stdlib-lm", new_tokens: int = 48, repeats: int = 3) -> list[dict]:
    """Greedy completions of Python prompts under each LLM technique (a couple of minutes on a
    laptop CPU with the defaults), each paired-timed against the full model in ``repeats``
    interleaved rounds after a warm-up round."""
    model, tok = load_lm(model_name)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok(_PROMPTS, return_tensors="pt", padding=True)

    def gen() -> torch.Tensor:
        return model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=tok.pad_token_id)

    configs = _lm_configs()
    results: dict[str, tuple] = {}

    def run(name: str) -> Callable[[], None]:
        cfg = configs[name]

        def call() -> None:
            handle = mmskip.apply(model, cfg) if cfg else None
            try:
                out = gen()
                stats = handle.stats() if handle else {"flops_fraction": 1.0}
            finally:
                if handle:
                    handle.remove()
            results[name] = (out[:, batch["input_ids"].shape[1]:], stats)
        return call

    names = list(configs)
    timings = paired(run(names[0]), {n: run(n) for n in names[1:]}, repeats=repeats, warmup=1)
    base_tokens = results["full model"][0]
    rows = []
    for name, cfg in configs.items():
        new, stats = results[name]
        handle = mmskip.apply(model, cfg) if cfg else None
        try:
            forced = decode_agreement(model, batch["input_ids"], batch["attention_mask"], base_tokens, tok.pad_token_id)
        finally:
            if handle:
                handle.remove()
        rows.append({
            "config": name, **_speed(timings.get(name), stats["flops_fraction"]), "flops_bound": 1 / stats["flops_fraction"],
            "agreement": forced, "free_running": float((new == base_tokens).float().mean()),
            "skipped_layers": stats.get("skipped_layers"), "sample": tok.decode(new[0], skip_special_tokens=True),
        })
    base_text = rows[0]["sample"]
    print(f"\n== Language: {model_name}, {len(_PROMPTS)} prompts x {new_tokens} greedy tokens, CPU ==")
    print("agreement with the full model's greedy tokens: teacher-forced while decoding / free-running")
    print(f"speedup: median of {repeats} interleaved pairs with the full model (quartiles), warm-up excluded")
    print(f"{'config':32s} {'speedup':>8s} {'quartiles':>10s} {'bound':>7s} {'forced':>7s} {'free':>6s}  skipped layers")
    d = model.config.hidden_size
    for r in [rows[0], *sorted(rows[1:], key=lambda r: -r["speedup"])]:  # what pays first
        print(f"{r['config']:32s} {r['speedup']:7.2f}x {_spread(r):>10s} {r['flops_bound']:6.2f}x {r['agreement']:7.2f} "
              f"{r['free_running']:6.2f}  {r['skipped_layers'] or ''}")
        _warn(r)
        if r["speedup"] < 1.0:
            print(f"{'':4s}^ slower than the full model: it removes {1 - 1 / r['flops_bound']:.0%} of the FLOPs, but "
                  f"its per-layer hooks and decisions cost more than that at d={d}, batch {len(_PROMPTS)}, on a CPU")
    print(f"\nprompt:\n{_PROMPTS[0]}\nfull model continues:\n{base_text}\n")
    print(f"Unified s=1.5 continues:\n{rows[1]['sample']}")
    return rows


@torch.no_grad()
def speculative_demo(model_name: str, new_tokens: int = 48, repeats: int = 3) -> list[dict]:
    """Lossless speculative decoding, one prompt at a time: SWIFT (``SelfSpeculativeConfig``), alone
    and with prompt lookup, and transformers' ``assistant_early_exit`` at half depth and
    ``prompt_lookup_num_tokens``, against plain greedy ``generate`` (paired: ``repeats`` interleaved
    rounds after a warm-up round)."""
    from mmskip.swift import SelfSpeculativeConfig

    model, tok = load_lm(model_name)
    layers = mmskip.registry.get_adapter(model).num_layers
    half = layers // 2
    prompts = [tok(p, return_tensors="pt").input_ids for p in _PROMPTS]
    configs = {"plain": ({}, None), "SWIFT (layer set searched on the fly)": ({}, SelfSpeculativeConfig()),
               "SWIFT + prompt lookup": ({}, SelfSpeculativeConfig(prompt_lookup=(2, 4))),
               f"early exit at layer {half}": ({"assistant_early_exit": half}, None),
               "transformers prompt lookup (peer)": ({"prompt_lookup_num_tokens": 6}, None)}
    outs: dict[str, list[torch.Tensor]] = {}
    accept: dict[str, float | None] = {}

    def run(name: str) -> Callable[[], None]:
        extra, cfg = configs[name]

        def call() -> None:
            handle = mmskip.apply(model, cfg) if cfg else None
            try:
                outs[name] = [model.generate(ids, max_new_tokens=new_tokens, do_sample=False, **extra)[0, ids.shape[1]:]
                              for ids in prompts]
                accept[name] = handle.stats().get("acceptance_rate") if handle else None
            finally:
                if handle:
                    handle.remove()
        return call

    names = list(configs)
    timings = paired(run(names[0]), {n: run(n) for n in names[1:]}, repeats=repeats, warmup=1)
    base = outs["plain"]
    rows = []
    for name in names[1:]:
        same = sum(torch.equal(a, b) for a, b in zip(outs[name], base))
        rows.append({"model": model_name, "config": name, **_speed(timings[name], None),
                     "identical": f"{same}/{len(base)}", "acceptance": accept[name]})
    print(f"\n== Lossless speculative decoding: {model_name}, {len(prompts)} prompts x {new_tokens} tokens, batch 1 ==")
    print(f"speedup: median of {repeats} interleaved pairs with plain decoding (quartiles), warm-up excluded")
    for r in sorted(rows, key=lambda r: -r["speedup"]):
        acc = f", draft acceptance {r['acceptance']:.2f}" if r["acceptance"] is not None else ""
        print(f"{r['config']:40s} {r['speedup']:5.2f}x ({_spread(r)})  identical outputs {r['identical']}{acc}")
        if r["speedup"] < 1.0:
            print(f"{'':4s}^ slower than plain decoding: on this {layers}-layer model at batch 1 a step costs mostly "
                  "per-layer overhead, and drafting plus verifying costs more than the plain steps it replaces")
    return rows


def _images(output) -> torch.Tensor:
    x = torch.as_tensor(output.images)
    x = x.permute(0, 3, 1, 2) if x.shape[-1] in (1, 3) else x
    return x.float().mean(1, keepdim=True).clamp(0, 1)  # grayscale digits in [0, 1]


def _methods(steps: int) -> dict[str, tuple[int, object]]:
    return {
        f"full DDIM-{steps}": (steps, None),
        f"fewer steps: DDIM-{steps // 3}": (steps // 3, None),
        "feature inheritance, every 3rd step": (steps, FeatureInheritanceConfig(schedule=schedules.interval(3))),
        f"feature inheritance, non-uniform {steps * 2 // 7}/{steps}": (
            steps, FeatureInheritanceConfig(schedule=nonuniform(steps, steps * 2 // 7))),
        f"combined: DDIM-{steps // 2}, inheritance every 2nd step": (
            steps // 2, FeatureInheritanceConfig(schedule=schedules.interval(2))),
    }


@torch.no_grad()
def diffusion_demo(name: str, out_dir: Path, steps: int = 50, repeats: int = 3) -> list[dict]:
    """Each method on ten digits against the full sampler, paired-timed (``repeats`` interleaved
    rounds after a warm-up round), with PSNR to the full run and the classifier's accuracy."""
    labels = list(range(10))
    if name == "digits-dit":
        pipe = SkipDiTPipeline.from_pretrained(zoo.path(name), dtype=torch.float32)

        def run(n_steps: int):
            return pipe(class_labels=labels, num_inference_steps=n_steps, guidance_scale=4.0,
                        generator=torch.Generator().manual_seed(0), output_type="np")
    else:
        pipe = SkipStableDiffusionPipeline.from_pretrained(zoo.path(name), dtype=torch.float32)
        prompts = [caption(d) for d in labels]  # the captions digits-sd was trained on

        def run(n_steps: int):
            return pipe(prompts, num_inference_steps=n_steps, guidance_scale=4.0,
                        generator=torch.Generator().manual_seed(0), output_type="np")
    pipe.set_progress_bar_config(disable=True)
    methods = _methods(steps)
    outputs: dict[str, Any] = {}
    fractions: dict[str, float] = {}

    def method(m: str) -> Callable[[], None]:
        n_steps, cfg = methods[m]

        def call() -> None:
            if cfg is not None:
                pipe.enable_skip(cfg)
            try:
                outputs[m] = run(n_steps)
                stats = pipe.skip_stats() if cfg is not None else {}
            finally:
                pipe.disable_skip()
            fractions[m] = stats.get("flops_fraction", 1.0) * n_steps / steps  # denoiser FLOPs kept
        return call

    base, *others = methods
    timings = paired(method(base), {m: method(m) for m in others}, repeats=repeats, warmup=1)
    images = {m: _images(outputs[m]) for m in methods}
    rows = [{
        "method": m, **_speed(timings.get(m), fractions[m]),
        "flops_bound": 1 / fractions[m],
        "psnr_db": psnr(images[m], images[base]), "accuracy": conditional_accuracy(images[m], labels),
    } for m in methods]
    print(f"\n== Diffusion: {name}, 10 digits, CFG 4, CPU ==")
    print(f"speedup: median of {repeats} interleaved pairs with the full run (quartiles), warm-up excluded; "
          "bound: the denoiser FLOPs kept")
    print(f"{'method':48s} {'speedup':>8s} {'quartiles':>10s} {'bound':>7s} {'PSNR to full':>13s} {'accuracy':>9s}")
    for r in [rows[0], *sorted(rows[1:], key=lambda r: -r["speedup"])]:  # what pays first
        shown = "exact" if r["psnr_db"] >= 99 else f"{r['psnr_db']:.1f} dB"
        print(f"{r['method']:48s} {r['speedup']:7.2f}x {_spread(r):>10s} {r['flops_bound']:6.2f}x {shown:>13s} "
              f"{r['accuracy']:9.2f}")
        _warn(r)
        if r["speedup"] < 1.0:
            print(f"{'':4s}^ slower than the full run: the inherited features save less than the hooks cost here")
    _grid(images, out_dir / f"{name}.png")
    return rows


def _grid(images: dict[str, torch.Tensor], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(images), 10, figsize=(10, 1.15 * len(images)))
    for row, (name, x) in enumerate(images.items()):
        for col in range(10):
            ax = axes[row, col]
            ax.imshow(x[col, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")


@torch.no_grad()
def vision_demo(n: int = 40) -> list[dict]:
    """Multimodal techniques on the zoo's VLMs, ``n`` held-out questions per type (about a minute on a
    CPU): accuracy beside the share of work that ran (``handle.stats()``, predicted = measured in
    ``benchmarks/vision_tokens.py`` / ``video_tokens.py`` / ``mue.py``, which also time them)."""
    from mmskip.vision import MoDConfig, MuEConfig, VideoMoDConfig, VideoStream

    from mmskip.zoo import florence_data, llava_data, video_data

    rows: list[dict] = []

    def run(model_name: str, name: str, cfg, fn: Callable[[], float]) -> None:
        model = models[model_name]
        handle = mmskip.apply(model, cfg) if cfg else None
        try:
            acc = fn()
            st = handle.stats() if handle else {}
        finally:
            if handle:
                handle.remove()
        dec = st.get("decoder")
        rows.append({"model": model_name, "config": name, "accuracy": acc,
                     "work": dec["run"] / dec["layer_tokens"] if dec else st.get("prefill_flops_fraction", 1.0),
                     "kv": st.get("kv_fraction", 1.0)})

    models, toks = {}, {}
    for name in ("digits-llava", "digits-video", "digits-florence"):
        models[name], toks[name] = zoo.load(name)

    def prefill_acc(model_name: str, inputs: dict, answers: list[str]) -> float:
        tok = toks[model_name]
        pred = models[model_name](**inputs, logits_to_keep=1).logits[:, -1].argmax(-1).tolist()
        return sum(p == tok.convert_tokens_to_ids(a) for p, a in zip(pred, answers, strict=True)) / len(answers)

    img = llava_data.heldout_set(toks["digits-llava"], n)
    img_in = llava_data.encode(toks["digits-llava"], img.pixel_values, img.questions)
    for name, cfg in (("unmodified", None), ("p-MoD PRD, attention", MoDConfig())):
        run("digits-llava", name, cfg, lambda: prefill_acc("digits-llava", img_in, img.answers))

    vid = video_data.heldout_set(toks["digits-video"], n)
    one = [i for i in range(len(vid.questions)) if int(vid.videos.n_clips[i]) == 1]  # one packed length per batch
    vid_in = video_data.encode(toks["digits-video"], [vid.videos.clips()[i] for i in one],
                               [vid.questions[i] for i in one])
    for name, cfg in (("unmodified", None), ("VideoLLM-MoD 20 %/frame", VideoMoDConfig())):
        run("digits-video", name, cfg, lambda: prefill_acc("digits-video", vid_in, [vid.answers[i] for i in one]))
    tok = toks["digits-video"]
    two = [i for i in range(len(vid.questions)) if int(vid.videos.n_clips[i]) == 2][: max(4, n // 4)]
    for name, cfg in (("streamed, unmodified", None), ("streamed, VideoLLM-MoD", VideoMoDConfig())):
        per_frame: list[float] = []

        def stream_acc(per_frame: list[float] = per_frame) -> float:
            right = 0
            for i in two:
                stream = VideoStream(models["digits-video"], prefix=torch.tensor(video_data.prefix_ids(tok)))
                for clip in video_data.pixel_values_videos([vid.videos.clips()[i]]):
                    stream.add_clip(clip)
                per_frame.append(stream.kv_bytes() / stream.frames)
                got = stream.ask(torch.tensor(video_data.question_ids(tok, vid.questions[i])))
                right += int(got[0, 0]) == tok.convert_tokens_to_ids(vid.answers[i])
            return right / len(two)

        run("digits-video", name, cfg, stream_acc)
        rows[-1]["kv_bytes_per_frame"] = sum(per_frame) / len(per_frame)

    cap = florence_data.heldout_set(toks["digits-florence"], max(4, n // 4))
    mue = MuEConfig(image_threshold=None, text_threshold=None, decoder_threshold=0.9, decay=1.0, floor=0.9,
                    min_layers=1)
    for name, cfg in (("unmodified", None), ("MuE decoder exits, 0.9", mue)):
        run("digits-florence", name, cfg, lambda: florence_data.score(
            florence_data.answers(models["digits-florence"], toks["digits-florence"], cap), cap)["all"])

    print(f"\n== Vision: zoo VLMs, {n} held-out questions per type, CPU ==")
    print("work = prefill FLOPs fraction (p-MoD, VideoLLM-MoD) or decoder layer-tokens run (MuE); kv = KV cache kept")
    print(f"{'model':16s} {'config':26s} {'accuracy':>8s} {'work':>6s} {'kv':>6s}")
    for r in rows:
        extra = f"  {r['kv_bytes_per_frame'] / 1024:.0f} KiB KV per frame" if "kv_bytes_per_frame" in r else ""
        print(f"{r['model']:16s} {r['config']:26s} {r['accuracy']:8.3f} {r['work']:6.3f} {r['kv']:6.3f}{extra}")
    return rows


def _demo_tune() -> Any:
    """``apps/demo_tune.py``, beside this file (apps/ is no package)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module("demo_tune")


def tune_demo(*args: Any, **kwargs: Any) -> list[dict]:
    """The summary's tuned fronts (``demo_tune.tune_demo``)."""
    return _demo_tune().tune_demo(*args, **kwargs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo", help="folder for the image grids")
    p.add_argument("--steps", type=int, default=50, help="sampler steps of the full diffusion run")
    p.add_argument("--only", choices=("language", "diffusion", "vision"), default=None, help="run one part of the demo")
    p.add_argument("--new-tokens", type=int, default=48, help="greedy tokens per prompt in the language part")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed pairs per configuration, interleaved with the baseline after a warm-up round "
                        "(median and quartiles; at least 3)")
    p.add_argument("--tune-budget", default="60s",
                   help="mmskip.tune's search budget per model for the summary (trials, or time such as 60s)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every section's rows to this JSON file")
    args = p.parse_args(argv)
    if args.repeats < 3:
        p.error(f"--repeats must be at least 3 (a median and a spread need three pairs), got {args.repeats}")
    language, speculative, diffusion = [], [], {}
    if args.only in (None, "language"):
        # stdlib-lm was trained without skipping; stdlib-lm-skip with LayerSkip's dropout + early-exit loss
        for name in [n for n in ("stdlib-lm", "stdlib-lm-skip") if n in zoo.available()]:
            language += [{**r, "model": name} for r in language_demo(model_name=name, new_tokens=args.new_tokens,
                                                                      repeats=args.repeats)]
            speculative += speculative_demo(name, new_tokens=args.new_tokens, repeats=args.repeats)
    if args.only in (None, "diffusion"):
        for name in ("digits-dit", "digits-sd"):
            diffusion[name] = diffusion_demo(name, Path(args.out), args.steps, repeats=args.repeats)
    vision = vision_demo() if args.only in (None, "vision") else []
    tuned: list[dict] = []
    if args.only in (None, "language", "diffusion"):
        models = [n for n in ("stdlib-lm", "stdlib-lm-skip") if language and n in zoo.available()]
        models += list(diffusion)
        tuned = tune_demo(models, args.tune_budget, args.repeats, Path(args.out))
    if args.json:
        import json

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"language": [{k: v for k, v in r.items() if k != "sample"}
                                                            for r in language], "speculative": speculative,
                                               "diffusion": diffusion, "vision": vision, "tuned": tuned},
                                              indent=1) + "\n")
    if tuned:
        print("\n== Summary: the best speedup at each quality level, from fronts tuned in this run (mmskip.tune; "
              "held-out inputs, paired against the unmodified model) ==")
        print("\n".join(_demo_tune().tuned_summary(tuned)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
