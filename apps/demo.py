"""The main job: every mmskip technique on the zoo's trained models, speed beside quality.

    bash run.sh demo            # what README's first command runs
    python apps/demo.py --out runs/demo

1. Language (``stdlib-lm``): Unified Layer Skipping, FFN-SkipLLM and LAC void layers, decode
   speedup and FLOPs bound beside agreement with the full model (``mmskip.demo``).
2. Diffusion (``digits-dit``, ``digits-sd``): drop-in ``SkipDiTPipeline`` /
   ``SkipStableDiffusionPipeline`` with feature inheritance (A-SDM), against the same sampler
   with fewer steps, each with speedup, PSNR to the full 50-step output and the accuracy of
   the zoo classifier on the requested digits. A PNG grid per pipeline is written to ``--out``.

Speedups are ratios against the unmodified pipeline in this run (best of two round-robin
runs); ``benchmarks/`` has the full comparisons with peers, FID and CLIP score.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from mmskip.diffusion import FeatureInheritanceConfig, nonuniform
from mmskip.pipelines import SkipDiTPipeline, SkipStableDiffusionPipeline

from mmskip import demo, schedules, zoo
from mmskip.eval import conditional_accuracy, psnr

_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


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
    }


@torch.no_grad()
def diffusion_demo(name: str, out_dir: Path, steps: int = 50) -> list[dict]:
    labels = list(range(10))
    if name == "digits-dit":
        pipe = SkipDiTPipeline.from_pretrained(zoo.path(name), torch_dtype=torch.float32)

        def run(n_steps: int):
            return pipe(class_labels=labels, num_inference_steps=n_steps, guidance_scale=4.0,
                        generator=torch.Generator().manual_seed(0), output_type="np")
    else:
        pipe = SkipStableDiffusionPipeline.from_pretrained(zoo.path(name), torch_dtype=torch.float32)
        prompts = [f"a handwritten digit {w}" for w in _WORDS]

        def run(n_steps: int):
            return pipe(prompts, num_inference_steps=n_steps, guidance_scale=4.0,
                        generator=torch.Generator().manual_seed(0), output_type="np")
    pipe.set_progress_bar_config(disable=True)
    methods = _methods(steps)
    run(steps)  # warm-up
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    images: dict[str, torch.Tensor] = {}
    for _ in range(2):
        for m, (n_steps, cfg) in methods.items():
            if cfg is not None:
                pipe.enable_skip(cfg)
            start = time.perf_counter()
            images[m] = _images(run(n_steps))
            seconds[m].append(time.perf_counter() - start)
            pipe.disable_skip()
    base = next(iter(methods))
    rows = [{
        "method": m, "speedup": min(seconds[base]) / min(seconds[m]),
        "psnr_db": psnr(images[m], images[base]), "accuracy": conditional_accuracy(images[m], labels),
    } for m in methods]
    print(f"\n== Diffusion: {name}, 10 digits, CFG 4, CPU ==")
    print(f"{'method':40s} {'speedup':>8s} {'PSNR to full':>13s} {'accuracy':>9s}")
    for r in rows:
        shown = "exact" if r["psnr_db"] >= 99 else f"{r['psnr_db']:.1f} dB"
        print(f"{r['method']:40s} {r['speedup']:7.2f}x {shown:>13s} {r['accuracy']:9.2f}")
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo", help="folder for the image grids")
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args(argv)
    demo.language_demo()
    for name in ("digits-dit", "digits-sd"):
        diffusion_demo(name, Path(args.out), args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
