"""The zoo pipelines ``benchmarks/diffusion.py`` measures: loading, the sampler users run, generation, metrics.

Each model is a :class:`ZooModel`: the pipeline as its mmskip drop-in class (same module objects),
its headline sampler, how to generate images in [0, 1] for the i-th benchmark condition, and the
quality metrics beside fidelity (FID, CLIP score, accuracy).

* ``digits-dit`` / ``digits-sd``: class label / caption ``i % 10``; DPM-Solver++ 2M at 25 steps
  (what users run on UNet/DiT pipelines), DDIM-50 as the secondary sampler.
* ``scenes-flux``: the i-th held-out scene caption; flow-matching Euler at 28 steps with true CFG
  against the empty prompt (Flux's default sampler and step count).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SAMPLERS = ("dpm++2m", "ddim", "euler")


def set_sampler(pipe: Any, sampler: str) -> None:
    """Swap ``pipe.scheduler`` for ``sampler``, keeping the trained noise schedule (its config)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    cfg = pipe.scheduler.config
    if sampler == "euler":
        if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
            raise ValueError(f"'euler' here is flow-matching Euler; {type(pipe.scheduler).__name__} is not flow matching")
        return
    if isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
        raise ValueError(f"{sampler!r} needs a diffusion (epsilon/v) model; this pipeline is flow matching: use 'euler'")
    if sampler == "dpm++2m":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2)
    elif sampler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(cfg)
    else:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {SAMPLERS}")


@dataclass
class ZooModel:
    """One benchmarked pipeline and how to drive it."""

    name: str
    kind: str  # dit | sd | flux
    pipe: Any
    sampler: str
    steps: int
    guidance: float
    conditions: Callable[[int], list[Any]]  # n -> the first n benchmark conditions
    metrics: Callable[[torch.Tensor, int], dict[str, float]] = field(repr=False)  # (images, n) -> FID, ...
    steps_front: tuple[int, ...] = ()

    def generate(self, runner: Any, n: int, steps: int, seed: int, batch: int,
                 before: Callable[[], None] | None = None, offset: int = 0) -> torch.Tensor:
        """Images (n, C, H, W) in [0, 1] for conditions ``offset .. offset + n``; batch b uses seed ``seed + b``."""
        runner.set_progress_bar_config(disable=True)
        conds = self.conditions(offset + n)[offset:]
        out = []
        for b, i in enumerate(range(0, n, batch)):
            g = torch.Generator().manual_seed(seed + b)
            if before is not None:
                before()
            out.append(self._call(runner, conds[i:i + batch], steps, g))
        return torch.cat(out).clamp(0, 1)

    @torch.no_grad()
    def _call(self, runner: Any, chunk: list[Any], steps: int, g: torch.Generator) -> torch.Tensor:
        if self.kind == "dit":
            res = runner(class_labels=chunk, num_inference_steps=steps, guidance_scale=self.guidance, generator=g,
                         output_type="np")
            return torch.as_tensor(res.images).permute(0, 3, 1, 2).float()
        if self.kind == "sd":
            return runner(prompt=chunk, num_inference_steps=steps, guidance_scale=self.guidance, generator=g,
                          output_type="pt").images.float()
        from mmskip.zoo.scenes_data import MAX_LENGTH

        return runner(chunk, negative_prompt=[""] * len(chunk), true_cfg_scale=self.guidance, height=32, width=32,
                      num_inference_steps=steps, max_sequence_length=MAX_LENGTH, generator=g,
                      output_type="pt").images.float()


def load(name: str, smoke: bool = False, sampler: str | None = None, steps: int | None = None,
         guidance: float | None = None, metrics: bool = True) -> ZooModel:
    """``name``'s pipeline and settings; ``smoke``: tiny random digits pipelines (the zoo scenes-flux is
    already small); ``metrics=False`` skips loading the FID / CLIP / classifier references."""
    if name in ("digits-dit", "digits-sd"):
        return _digits(name, smoke, sampler or "dpm++2m", steps or 25, 4.0 if guidance is None else guidance, metrics)
    if name == "scenes-flux":
        return _scenes(smoke, sampler or "euler", steps or 28, 4.0 if guidance is None else guidance, metrics)
    raise ValueError(f"unknown benchmark model {name!r}; choose digits-dit, digits-sd or scenes-flux")


def _front(sampler: str, steps: int) -> tuple[int, ...]:
    """Fewer-step counts for the front: from ~0.8x down to ~0.16x of the headline's steps."""
    fracs = (0.8, 0.6, 0.48, 0.4, 0.32, 0.24, 0.2, 0.16) if sampler != "ddim" else (0.5, 0.34, 0.24)
    return tuple(sorted({max(2, round(f * steps)) for f in fracs} - {steps}, reverse=True))


def _digits(name: str, smoke: bool, sampler: str, steps: int, guidance: float, metrics: bool) -> ZooModel:
    from mmskip.pipelines import SkipDiTPipeline, SkipStableDiffusionPipeline

    from mmskip.zoo.data import caption

    dit = "dit" in name
    if smoke:
        pipe = _tiny_digits(dit)
    else:
        from mmskip import zoo

        zp = zoo.load(name)
        pipe = (SkipDiTPipeline if dit else SkipStableDiffusionPipeline)(**zp.components)
    set_sampler(pipe, sampler)
    real = clip = None
    if metrics and not smoke:
        from mmskip.eval.clip_score import load_clip
        from mmskip.eval.images import reference_images

        real = reference_images("test")
        try:
            clip = load_clip("digits-clip")
        except FileNotFoundError as err:  # the zoo CLIP is trained separately
            print(f"no CLIP score: {err}", flush=True)

    def conditions(n: int) -> list[Any]:
        return [i % 10 if dit else caption(i % 10) for i in range(n)]

    def quality(imgs: torch.Tensor, n: int) -> dict[str, float]:
        from mmskip.eval import clip_score, conditional_accuracy, fid

        if real is None:
            return {}
        labels = [i % 10 for i in range(n)]
        out = {"fid": fid(real, imgs), "accuracy": conditional_accuracy(imgs, labels)}
        if clip is not None:
            out["clip_score"] = clip_score(imgs, [caption(c) for c in labels], clip)
        return out

    return ZooModel(name, "dit" if dit else "sd", pipe, sampler, steps, guidance, conditions, quality,
                    _front(sampler, steps))


def _tiny_digits(dit: bool) -> Any:
    import tempfile

    from _test_denoisers import tiny_pipeline_components, tiny_unet
    from mmskip.pipelines import SkipDiTPipeline, SkipStableDiffusionPipeline

    from mmskip.zoo.sd_model import make_text_encoder
    from mmskip.zoo.sd_tokenizer import build_clip_tokenizer

    comps, _ = tiny_pipeline_components("dit" if dit else "sd")
    if dit:
        return SkipDiTPipeline(**comps)
    tok = build_clip_tokenizer(Path(tempfile.mkdtemp()))
    text_encoder = make_text_encoder(len(tok), tok.bos_token_id, tok.eos_token_id).eval()
    comps.update(unet=tiny_unet(cross_attention_dim=text_encoder.config.hidden_size), tokenizer=tok,
                 text_encoder=text_encoder)
    return SkipStableDiffusionPipeline(**comps)


def _scenes(smoke: bool, sampler: str, steps: int, guidance: float, metrics: bool) -> ZooModel:
    from mmskip.pipelines import SkipFluxPipeline

    from mmskip import zoo
    from mmskip.zoo.scenes_data import make_split

    pipe = SkipFluxPipeline(**zoo.load("scenes-flux").components)
    set_sampler(pipe, sampler)
    cache: dict[int, tuple[Any, list[str], list[Any]]] = {}

    def split(n: int) -> tuple[Any, list[str], list[Any]]:
        if n not in cache:
            cache[n] = make_split("test", n)
        return cache[n]

    classifier = None
    if metrics and not smoke:
        from mmskip.zoo.loaders import load_scenes_classifier

        classifier = load_scenes_classifier(zoo.path("scenes-classifier"))

    def quality(imgs: torch.Tensor, n: int) -> dict[str, float]:
        from mmskip.eval.fid import scenes_fid
        from mmskip.zoo.scenes_classifier import prompt_accuracy
        from mmskip.zoo.scenes_data import scenes_tensor

        if classifier is None:
            return {}
        images, _, scenes = split(n)
        real = scenes_tensor(images) * 0.5 + 0.5
        acc = prompt_accuracy(classifier, imgs * 2 - 1, scenes)
        return {"fid": scenes_fid(real, imgs, classifier), "accuracy": acc["exact"],
                **{f"accuracy_{k}": v for k, v in acc.items() if k != "exact"}}

    return ZooModel("scenes-flux", "flux", pipe, sampler, steps, guidance, lambda n: split(n)[1], quality,
                    _front(sampler, steps))
