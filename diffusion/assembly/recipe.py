"""The model-assembly recipe on the zoo's ``digits-sd``: measure, assemble, distil in stages, save.

``python -m mmskip.diffusion.assembly [--out DIR] [--speedup 1.22]`` (or ``mmskip zoo
digits-sd-assembled``):

1. importance of every candidate edit: bypass it and measure the change of the final latents
   of a 10-step sampling run on 40 captions (the change of one step's noise prediction on real
   latents misses what matters: bypassing the mid block changes it by 1 %, yet the samples
   lose their digit); and the FLOPs it saves, on real noised latents; the edits are taken least important per FLOP first until the UNet
   is ``--speedup`` times cheaper per step;
2. multi-stage distillation: one edit more per stage, each stage distilled from the *full*
   teacher (output, feature and task losses), starting from the previous stage's weights;
3. ME-CondConv: a copy of the final student with every ResNet convolution made a 4-expert
   conditional convolution, distilled further (``unet_condconv/``) for the same steps as the
   last stage, and the plain student distilled for those steps too (``unet/``) so the two are
   compared at equal training;
4. a pipeline folder (``model_index.json``; text encoder, tokenizer, VAE and scheduler linked to
   ``digits-sd``'s) that ``StableDiffusionPipeline.from_pretrained`` loads, metrics and a model card.

Each stage writes resumable checkpoints; a rerun skips finished stages.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from .condconv import insert_condconv
from .distill import DistillConfig, distill
from .importance import CalibrationBatch, choose_edits, edit_importance, edit_savings, sampled_latents
from .io import load_assembled, save_assembled
from .plan import assemble_unet, candidate_edits, parameter_count

__all__ = ["assemble_digits_sd", "main"]

logger = logging.getLogger(__name__)

BATCH = 64
STAGE_STEPS = 600
LR = 5e-4
GUIDANCE_WEIGHT = 4.0  # the error in (cond - uncond) is what CFG 4 multiplies
EXPERTS = 4
LINKED = ("text_encoder", "tokenizer", "vae", "scheduler", "feature_extractor")


def _digits_data(pipe, seed: int):
    """``(batch, empty)``: ``batch(step)`` samples scaled training latents (4 augmented copies) and
    caption hidden states (10 % empty prompts); ``empty`` is the empty prompt's hidden states."""
    from mmskip.zoo.data import DIGIT_NAMES, TEMPLATES, encode_augmented, load_split
    from mmskip.zoo.sd_tokenizer import MAX_LENGTH

    g = torch.Generator().manual_seed(seed)
    x, y = load_split("train")
    lat = encode_augmented(pipe.vae, x, 4, g)
    lab = y.repeat(4)
    tok = pipe.tokenizer

    @torch.no_grad()
    def encode(texts: list[str]) -> torch.Tensor:
        ids = tok(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
        return pipe.text_encoder(input_ids=ids).last_hidden_state

    ctx = torch.stack([encode([t.format(name=DIGIT_NAMES[d], d=d) for t in TEMPLATES]) for d in range(10)])
    empty = encode([""])[0]

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        gg = torch.Generator().manual_seed(seed * 100003 + step)
        idx = torch.randint(0, len(lab), (BATCH,), generator=gg)
        c = ctx[lab[idx], torch.randint(0, len(TEMPLATES), (BATCH,), generator=gg)].clone()
        c[torch.rand(BATCH, generator=gg) < 0.1] = empty  # keep the unconditional branch for CFG
        return lat[idx], c

    return batch, empty


def _calibration(batch, noise_scheduler) -> CalibrationBatch:
    """Real digit latents noised at random timesteps, with their captions (a step apart from training's)."""
    z, c = batch(10_000_000)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (z.shape[0],), generator=g)
    return CalibrationBatch(noise_scheduler.add_noise(z, torch.randn(z.shape, generator=g), t), t, c)


def _link_components(out: Path, teacher_dir: Path) -> None:
    for name in LINKED:
        src, dst = teacher_dir / name, out / name
        if src.exists() and not dst.exists():
            os.symlink(os.path.relpath(src.resolve(), out), dst)
    index = json.loads((teacher_dir / "model_index.json").read_text())
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def assemble_digits_sd(out: Path, steps: int = STAGE_STEPS, speedup: float = 1.22, seed: int = 0) -> dict:
    """Run the recipe into ``out`` (see the module docstring), ``steps`` distillation steps per stage."""
    from diffusers import DDPMScheduler

    from mmskip import zoo

    torch.manual_seed(seed)
    t_start = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = zoo.load("digits-sd")
    teacher = pipe.unet.eval().requires_grad_(False)
    noise = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    batch, empty = _digits_data(pipe, seed)
    dcfg = DistillConfig(steps=steps, lr=LR, guidance_weight=GUIDANCE_WEIGHT)
    calib = _calibration(batch, noise)  # for the FLOPs each edit saves
    from mmskip.zoo.data import caption

    imp = edit_importance(teacher, sampled_latents(pipe, [caption(i % 10) for i in range(40)], steps=10))
    sav = edit_savings(teacher, calib)
    edits = choose_edits(imp, sav, speedup)
    logger.info("importance %s, FLOPs saved %s -> removing %s", imp, sav, edits)
    info = {"importance": imp, "flops_saved": sav, "edits": edits, "steps_per_stage": steps, "stages": []}
    student, done = teacher, []
    for k, edit in enumerate(edits):
        done.append(edit)
        stage_dir = out / "stages" / f"{k}_{edit}"
        if (stage_dir / "unet" / "config.json").is_file():
            student = load_assembled(stage_dir / "unet")
            continue
        student = assemble_unet(student, [edit])
        hist = distill(student, teacher, batch, noise, dcfg, out=stage_dir, uncond=empty,
                       desc=f"stage {k + 1}/{len(edits)}: without {', '.join(done)}")
        save_assembled(student, stage_dir / "unet")
        info["stages"].append({"edits": list(done), "history": hist})
    # ME-CondConv vs the plain student, each distilled for the same further steps
    finals = {}
    for name, experts in (("unet", 0), ("unet_condconv", EXPERTS)):
        if (out / name / "config.json").is_file():
            finals[name] = load_assembled(out / name)
            continue
        s = load_assembled(out / "stages" / f"{len(edits) - 1}_{edits[-1]}" / "unet")
        if experts:
            insert_condconv(s, num_experts=experts)
        distill(s, teacher, batch, noise, dcfg, out=out / "stages" / f"final_{name}", uncond=empty,
                desc=f"final: {name}")
        save_assembled(s, out / name, dtype=torch.float16)
        finals[name] = s
    _link_components(out, zoo.path("digits-sd"))
    info["wall_time_s"] = time.time() - t_start
    info["parameters"] = {"teacher": parameter_count(teacher), **{k: parameter_count(v) for k, v in finals.items()}}
    info["candidate_edits"] = [e.name for e in candidate_edits(teacher)]
    (out / "assembly.json").write_text(json.dumps(info, indent=1) + "\n")
    _card(out, info, finals["unet"], pipe)
    shutil.rmtree(out / "stages", ignore_errors=True)  # checkpoints of finished stages
    return info


def _card(out: Path, info: dict, student, pipe) -> None:
    from mmskip.eval.images import evaluate_class_pipeline
    from mmskip.zoo.card import write_card

    from .plan import flops_per_call

    z = torch.randn(2, 4, 8, 8)
    t = torch.tensor([500, 500])
    c = torch.randn(2, 16, pipe.unet.config.cross_attention_dim)
    f_teacher, f_student = flops_per_call(pipe.unet, z, t, c), flops_per_call(student, z, t, c)
    full = evaluate_class_pipeline(pipe, n=200, steps=25, guidance_scale=4.0, seed=0)
    pipe.unet = student
    light = evaluate_class_pipeline(pipe, n=200, steps=25, guidance_scale=4.0, seed=0)
    metrics = {"UNet FLOPs per step vs digits-sd": f_student / f_teacher,
               f"UNet parameters (digits-sd: {info['parameters']['teacher']})": info["parameters"]["unet"],
               "DDIM-25 CFG 4 accuracy (200 samples), digits-sd": full["accuracy"],
               "DDIM-25 CFG 4 accuracy (200 samples), assembled": light["accuracy"],
               "DDIM-25 FID, digits-sd": full["fid"], "DDIM-25 FID, assembled": light["fid"]}
    write_card(out, "digits-sd-assembled",
               f"`digits-sd`'s UNet assembled by measured importance (removed: {', '.join(info['edits'])}) and distilled "
               "from it (A-SDM model assembly). `unet/` is a plain `UNet2DConditionModel`. The recipe also writes "
               f"`unet_condconv/`, the same with {EXPERTS}-expert ME-CondConv in every ResNet convolution (load it "
               "with `mmskip.diffusion.assembly.load_assembled`; not shipped in the zoo: 7 MB). Text encoder, "
               "tokenizer, VAE and scheduler are `digits-sd`'s (linked).",
               "digits-sd's training digits (4 augmented copies) and captions, 10 % empty prompts; teacher: digits-sd.",
               f"importance = relative change of the final latents of a 10-step sampling run on 40 captions when an "
               f"edit's units are bypassed "
               f"({json.dumps({k: round(v, 4) for k, v in info['importance'].items()})}); edits taken least important "
               f"per FLOP first; one distillation stage per edit (task + output-KD + feature-KD + guidance-direction losses, "
               f"{info['steps_per_stage']} steps of batch {BATCH}), then {info['steps_per_stage']} more steps for each "
               "final variant.",
               metrics, info["wall_time_s"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/zoo/digits-sd-assembled"))
    ap.add_argument("--speedup", type=float, default=1.22, help="FLOPs speedup per step of the assembled UNet")
    ap.add_argument("--stage-steps", type=int, default=STAGE_STEPS)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    info = assemble_digits_sd(args.out, args.stage_steps, args.speedup)
    print(json.dumps({k: v for k, v in info.items() if k != "stages"}, indent=1))
    return 0
