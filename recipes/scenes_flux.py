"""Recipe for ``scenes-flux``: a small text-to-image ``FluxPipeline`` on procedural scenes, flow matching.

Today's shape at toy size: a ``FluxTransformer2DModel`` (double-stream then single-stream
blocks, rotary positions) on ``scenes-vae`` latents (4×16×16, packed by the pipeline into 64
tokens of 16 channels), a pooled ``CLIPTextModel`` and a second ``CLIPTextModel`` standing in
for Flux's T5 (the pipeline only needs its hidden states), both on one BPE ``CLIPTokenizer``
trained on the scene captions. Everything is trained jointly from scratch with the rectified-flow
loss (velocity ``noise - x0`` at logit-normal noise levels), 10 % empty prompts for guidance.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mmskip.eval.fid import scenes_fid
from mmskip.train import fit
from mmskip.zoo.card import write_card
from mmskip.zoo.scenes_data import (
    _NUMBER,
    COLORS,
    COUNTS,
    MAX_LENGTH,
    RELATIONS,
    SHAPES,
    make_split,
    scenes_tensor,
)
from mmskip.zoo.sd_tokenizer import build_clip_tokenizer

from ._fit import RecipeTask, ema_copies, one_cycle

__all__ = ["make_transformer", "make_text_encoders", "train_scenes_flux", "caption_vocabulary", "generate_scenes",
           "evaluate_scenes_pipeline"]

STEPS = 4000
BATCH = 48
LR = 1e-3
EMA = 0.998
N_TRAIN = 12000


def caption_vocabulary() -> list[str]:
    """Phrases covering every word of the scene captions (the tokenizer's training text)."""
    words = [f"{_NUMBER[c]} {col} {s}{'' if c == 1 else 's'}" for c in COUNTS for col in COLORS for s in SHAPES]
    return words + [f"{a} {r} {b}" for a, b in zip(words, reversed(words), strict=True) for r in RELATIONS]


def make_transformer():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4,
                                  attention_head_dim=32, num_attention_heads=3, joint_attention_dim=96,
                                  pooled_projection_dim=64, guidance_embeds=False, axes_dims_rope=(8, 12, 12))


def make_text_encoders(vocab_size: int, bos: int, eos: int):
    """(pooled CLIP, sequence encoder standing in for T5)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    def clip(hidden: int, layers: int) -> CLIPTextModel:
        return CLIPTextModel(CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, max_position_embeddings=MAX_LENGTH, bos_token_id=bos, eos_token_id=eos,
            pad_token_id=eos, projection_dim=hidden))

    return clip(64, 1), clip(96, 2)


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # Flux's dynamic shifting, with image sizes scaled to this model's 64 tokens
    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=64, max_image_seq_len=256,
                                           base_shift=0.5, max_shift=1.15, shift=1.0)


class _Flow(RecipeTask):
    """Rectified flow: the velocity ``noise - x0`` at logit-normal noise levels, 10 % empty prompts;
    transformer and both text encoders train jointly."""

    def __init__(self, transformer, pooled_enc, seq_enc, z: torch.Tensor, ids: torch.Tensor, empty: torch.Tensor,
                 seed: int) -> None:
        from diffusers import FluxPipeline

        super().__init__({"transformer": transformer, "pooled": pooled_enc, "sequence": seq_enc}, seed, "scenes-flux")
        self.transformer, self.pooled_enc, self.seq_enc = transformer, pooled_enc, seq_enc
        self.z, self.ids, self.empty = z, ids, empty
        # positions as FluxPipeline builds them: text ids zero, image ids (row, column) of the 8x8 packed grid
        self.img_ids = FluxPipeline._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32)
        self.txt_ids = torch.zeros(MAX_LENGTH, 3)
        self.pack = FluxPipeline._pack_latents

    def draw(self, g: torch.Generator) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, len(self.z), (BATCH,), generator=g)
        tok = self.ids[idx].clone()
        tok[torch.rand(BATCH, generator=g) < 0.1] = self.empty
        s = torch.sigmoid(torch.randn(BATCH, generator=g))  # logit-normal noise levels (SD3 / Flux)
        return {"z0": self.z[idx], "tok": tok, "s": s, "noise": torch.randn(self.z[idx].shape, generator=g)}

    def loss(self, b: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        z0, s, noise = b["z0"], b["s"], b["noise"]
        xt = (1 - s.view(-1, 1, 1, 1)) * z0 + s.view(-1, 1, 1, 1) * noise
        pooled = self.pooled_enc(b["tok"]).pooler_output
        seq = self.seq_enc(b["tok"]).last_hidden_state
        pred = self.transformer(hidden_states=self.pack(xt, len(z0), 4, 16, 16), encoder_hidden_states=seq,
                                pooled_projections=pooled, timestep=s, img_ids=self.img_ids,
                                txt_ids=self.txt_ids).sample
        return {"mse": F.mse_loss(pred, self.pack(noise - z0, len(z0), 4, 16, 16))}


def train_scenes_flux(out: Path, steps: int = STEPS, seed: int = 0) -> dict:
    from diffusers import AutoencoderKL, FluxPipeline

    torch.manual_seed(seed)
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    vae_dir = Path(out).parent / "scenes-vae"
    if not (vae_dir / "config.json").is_file():
        from mmskip.zoo import path

        vae_dir = path("scenes-vae")
    vae = AutoencoderKL.from_pretrained(vae_dir, dtype=torch.float32).eval()
    tokenizer = build_clip_tokenizer(out / "tokenizer", caption_vocabulary())
    tokenizer.model_max_length = MAX_LENGTH
    images, captions, _ = make_split("train", N_TRAIN)
    with torch.no_grad():
        x = scenes_tensor(images)
        z = torch.cat([vae.encode(x[i:i + 500]).latent_dist.mode() for i in range(0, len(x), 500)])
        z = (z - vae.config.shift_factor) * vae.config.scaling_factor
    ids = tokenizer(captions, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=MAX_LENGTH, return_tensors="pt").input_ids[0]
    transformer = make_transformer()
    pooled_enc, seq_enc = make_text_encoders(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    task = _Flow(transformer, pooled_enc, seq_enc, z, ids, empty, seed)
    result = fit(task, one_cycle(steps, LR, pct_start=0.03, max_grad_norm=1.0, ema=EMA, ema_warmup=True,
                                 batch_size=BATCH, seed=seed))
    e = ema_copies(task.modules, result.ema)
    emas = [e["transformer"], e["pooled"], e["sequence"]]
    wall = time.time() - t0
    pipe = FluxPipeline(scheduler=_scheduler(), vae=vae, text_encoder=emas[1], tokenizer=tokenizer,
                        text_encoder_2=emas[2], tokenizer_2=tokenizer, transformer=emas[0])
    pipe.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "train_info.json").write_text(json.dumps({"wall_time_s": wall, "steps": steps}) + "\n")
    return finish_scenes_card(out, wall, steps)


def finish_scenes_card(out: Path, wall: float, steps: int) -> dict:
    """Measure the saved pipeline (prompt accuracy, FID) and write its model card."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(out)
    n = {"transformer": pipe.transformer, "CLIP (pooled)": pipe.text_encoder, "sequence encoder": pipe.text_encoder_2}
    metrics = {**evaluate_scenes_pipeline(out), **{f"{k} parameters": sum(p.numel() for p in m.parameters())
                                                   for k, m in n.items()}}
    write_card(out, "scenes-flux",
               "Text-to-image `FluxPipeline` for prompts like \"two red circles left of a blue square\" (32×32).",
               f"{N_TRAIN} procedural scenes (`mmskip.zoo.scenes_data`), encoded once by `scenes-vae`.",
               f"Flux transformer 2 double + 4 single blocks, width 96; text encoders CLIP 1×64 (pooled) and "
               f"2×96 (sequence, in T5's place); trained jointly from scratch, rectified flow, logit-normal "
               f"noise levels; AdamW lr {LR} (3 % warm-up, cosine to 0; `mmskip.train.fit`), batch {BATCH}, {steps} steps, EMA {EMA} (saved, fp16). "
               "Sampler: flow-matching Euler with Flux's dynamic shifting.", metrics, wall,
               extra="\nPrompt accuracy = `scenes-classifier` reads back every attribute of the prompted scene "
               "(exact) or one attribute; FID uses its 128-d features against held-out scenes.\n")
    return metrics


def generate_scenes(pipe, prompts: list[str], steps: int = 28, cfg: float = 4.0, seed: int = 0,
                    batch: int = 50) -> torch.Tensor:
    """Images in [0, 1] for ``prompts`` (true classifier-free guidance against the empty prompt)."""
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        g = torch.Generator().manual_seed(seed + i)
        out.append(pipe(chunk, negative_prompt=[""] * len(chunk), true_cfg_scale=cfg, height=32, width=32,
                        num_inference_steps=steps, max_sequence_length=MAX_LENGTH, generator=g,
                        output_type="pt").images.float())
    return torch.cat(out).clamp(0, 1)


def evaluate_scenes_pipeline(folder: Path, n: int = 300) -> dict:
    """Prompt accuracy and FID of the pipeline in ``folder`` on ``n`` held-out scene prompts."""
    from diffusers import FluxPipeline

    from mmskip.zoo import path
    from mmskip.zoo.loaders import load_scenes_classifier
    from mmskip.zoo.scenes_classifier import prompt_accuracy

    cls_dir = Path(folder).parent / "scenes-classifier"
    classifier = load_scenes_classifier(cls_dir if (cls_dir / "config.json").is_file() else path("scenes-classifier"))
    pipe = FluxPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    images, captions, scenes = make_split("test", n)
    real = scenes_tensor(images) * 0.5 + 0.5
    t0 = time.perf_counter()
    fake = generate_scenes(pipe, captions)
    sample_s = time.perf_counter() - t0
    acc = prompt_accuracy(classifier, fake * 2 - 1, scenes)
    train_real = scenes_tensor(make_split("val", n)[0]) * 0.5 + 0.5
    return {f"flow Euler 28 steps, CFG 4: prompt accuracy, exact ({n} prompts)": acc["exact"],
            **{f"prompt accuracy: {k}": v for k, v in acc.items() if k != "exact"},
            "FID vs held-out scenes (scenes-classifier features)": scenes_fid(real, fake, classifier),
            "FID of other real scenes vs held-out (floor)": scenes_fid(real, train_real, classifier),
            f"seconds to sample {n} images": sample_s}
