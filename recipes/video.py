"""Recipe for ``digits-video``: a tiny video LLaVA (``LlavaOnevisionForConditionalGeneration``) answering
questions about 1-2-clip videos of digits (see :mod:`mmskip.zoo.video_data`), trained from scratch or on
from a saved folder (``init``). Training packs several questions about a video into one row
(:mod:`recipes._video_pack`), and a training-only running tally (:mod:`recipes._video_tally`) gives the
language model a dense signal for the aggregation over frames that the multi-frame questions need.

``mmskip zoo digits-video`` trains from scratch on a CPU; ``--device cuda`` (bf16 autocast, a larger
batch) trains a better one on a GPU in minutes. The shipped model's card says how it was trained.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mmskip.train import TrainConfig, fit
from mmskip.zoo import video_data as D
from mmskip.zoo.card import write_card
from mmskip.zoo.video_data import COPIES, PALETTE
from mmskip.zoo.video_model import make_model
from mmskip.zoo.word_tokenizer import majority_baseline as _majority

from ._fit import step_generator
from ._video_pack import PER_VIDEO, packed_batch, packed_questions
from ._video_tally import LAYER as TALLY_LAYER
from ._video_tally import OUTPUTS as TALLY_OUTPUTS
from ._video_tally import frame_ends, tally_loss, tally_targets, vision_positions
from ._vlm_stages import StageTask, spread_loss
from .llava import _autocast, save_and_score

__all__ = ["STEPS", "VISION_STEPS", "BATCH", "evaluate", "majority_baseline", "patch_labels", "train_video"]

STEPS = {"cuda": 4000, "cpu": 1500}  # steps of the whole model
VISION_STEPS = {"cuda": 2000, "cpu": 1500}  # vision warm-up steps before them (see train_video)
BATCH = {"cuda": 256, "cpu": 16}  # videos a step (a vision warm-up step: 2 × BATCH one-clip videos)
LR = 1e-3
AUX = 0.5  # weight of the probe's digit losses on the projector's output (a training-only linear probe)
WARMUP = 200
BACKGROUND = 10  # the probe's class for a patch without the digit
ATTN = 1.0  # weight of the training-only attention loss (see attention_loss)
ATTN_LAYER, ATTN_HEADS = 3, 2  # the decoder layer whose first ATTN_HEADS heads it supervises
TALLY = 0.5  # weight of the running-tally loss on the language model (recipes._video_tally; training only)


@torch.no_grad()
def evaluate(model, batch: D.Batch, device: torch.device | str = "cpu", chunk: int = 100) -> dict[str, float]:
    """Teacher-forced accuracy of the answer token (= greedy first token), overall and per question type."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    correct = []
    for i in range(0, len(batch), chunk):
        b = batch[i:i + chunk]
        ids = b.input_ids.to(device)
        rows = torch.arange(len(ids), device=device)
        with _autocast(device):
            logits = model(input_ids=ids, attention_mask=b.attention_mask.to(device),
                           pixel_values_videos=b.pixel_values_videos.to(device, dtype)).logits
        pos = b.answer_pos.to(device)
        correct.append((logits[rows, pos - 1].argmax(-1) == ids[rows, pos]).cpu())
    correct = torch.cat(correct).float()
    model.train(was_training)
    res = {"all": correct.mean().item()}
    for t in D.QTYPES:
        m = torch.tensor([q == t for q in batch.qtypes])
        if m.any():
            res[t] = correct[m].mean().item()
    return res


def majority_baseline(batch: D.Batch) -> dict[str, float]:
    """Accuracy of always giving the most frequent answer of each question type (the chance level)."""
    return _majority(batch.answers, batch.qtypes, D.QTYPES)


def patch_labels(videos: D.Videos) -> torch.Tensor:
    """The probe's target for each of the 64 patches of each frame of ``videos``' clips, in
    ``pixel_values_videos`` order: ``(frames, 64)``, the frame's digit where the patch's centre lies on the
    16×16 digit, :data:`BACKGROUND` elsewhere."""
    used = torch.arange(D.MAX_CLIPS)[None] < videos.n_clips[:, None]  # (n, MAX_CLIPS)
    labels = videos.labels[used].flatten()  # (frames,)
    pos = videos.positions[used].flatten(0, 1)  # (frames, 2)
    side = D.FRAME_SIZE // D.PATCH
    centre = torch.arange(side) * D.PATCH + D.PATCH // 2
    inside_r = (centre[None] >= pos[:, :1]) & (centre[None] < pos[:, :1] + D.DIGIT_SIZE)  # (frames, 8)
    inside_c = (centre[None] >= pos[:, 1:]) & (centre[None] < pos[:, 1:] + D.DIGIT_SIZE)
    inside = (inside_r[:, :, None] & inside_c[:, None, :]).flatten(1)  # (frames, 64)
    return torch.where(inside, labels[:, None], torch.full_like(inside, BACKGROUND, dtype=torch.long))


def probe_loss(probe: torch.nn.Module, feats: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """The vision side's training signal: ``probe`` (linear, 11 classes) on the projector's output ``feats``
    ``(frames, 64, d)``: each patch -> its :func:`patch_labels` class, plus the mean of a frame's patches -> the
    frame's digit (this frame-level term makes the tokens carry the digit much sooner than the per-patch one
    alone)."""
    frame_digit = cells.masked_fill(cells == BACKGROUND, -1).amax(1)  # every frame shows one digit
    per_patch = F.cross_entropy(probe(feats).flatten(0, 1).float(), cells.flatten())
    per_frame = F.cross_entropy(probe(feats.mean(1))[:, :BACKGROUND].float(), frame_digit)
    return per_patch + per_frame


@torch.no_grad()
def _probe_accuracy(model, probe, captured: dict, batch: D.Batch, device: torch.device, chunk: int = 100) -> float:
    """How often the probe reads a frame's digit from the mean of its projected patches (held-out frames)."""
    was_training = model.training
    model.eval()
    hits = []
    for i in range(0, len(batch), chunk):
        b = batch[i:i + chunk]
        with _autocast(device):
            model.model.get_video_features(pixel_values_videos=b.pixel_values_videos.to(device))
            pred = probe(captured["feats"].mean(1))[:, :BACKGROUND].argmax(-1).cpu()
        used = torch.arange(D.MAX_CLIPS)[None] < b.videos.n_clips[:, None]
        hits.append(pred == b.videos.labels[used].flatten())
    model.train(was_training)
    return torch.cat(hits).float().mean().item()


def _threads() -> str:
    n = torch.get_num_threads()
    return f"{n} thread{'s' if n > 1 else ''}"


def attention_targets(videos: D.Videos, questions: list[list[tuple[str, str]]]) -> torch.Tensor:
    """``(n, Q, frames × 16)`` booleans: for each of a video's ``Q`` packed questions, the vision tokens (after
    pooling, clips' newline tokens left out, in :func:`recipes._video_tally.vision_positions`' order) that show
    a digit in the frames it attends to (:func:`attended_frames`). All videos have the same number of clips and
    questions."""
    n, frames = len(videos), int(videos.n_clips[0]) * D.FRAMES
    side = D.FRAME_SIZE // D.PATCH  # 8 patches a side, pooled 2×2 (the mean of 2×2 patches, row-major)
    digit = (patch_labels(videos) != BACKGROUND).view(n, frames, side // 2, 2, side // 2, 2).any(5).any(3)
    named = torch.stack([torch.stack([attended_frames(q, a, frames) for q, a in qa]) for qa in questions])
    return (named[..., None] & digit.flatten(2)[:, None]).flatten(2)


def attended_frames(question: str, answer: str, n_frames: int) -> torch.Tensor:
    """The frames whose digit tokens a question's answer position is taught to attend to, ``(n_frames,)``
    booleans: for ``which frame shows D first ?`` the frame its answer names (the earliest frame showing D;
    an even spread over every frame, which the answer also depends on, averages away which frame came
    first), for the others :func:`mmskip.zoo.video_data.question_frames`."""
    if question.startswith("which frame shows"):
        frames = torch.zeros(n_frames, dtype=torch.bool)
        frames[int(answer) - 1] = True
        return frames
    return D.question_frames(question, n_frames)


def attention_loss(attn: torch.Tensor, labels: torch.Tensor, vision: torch.Tensor, targets: torch.Tensor
                   ) -> torch.Tensor:
    """:func:`recipes._vlm_stages.spread_loss` of the attention ``attn`` ``(n, H, L, L)`` that each packed
    question's answer-predicting position pays the vision tokens at ``vision``, against ``targets`` (:func:
    `attention_targets`). A question's answer is its block's first labelled token (``labels``: answer,
    ``</s>``)."""
    n, q = targets.shape[:2]
    labelled = (labels != -100).nonzero()[:, 1].view(n, 2 * q)[:, 0::2]  # (n, Q) answer positions
    rows = attn[torch.arange(n, device=attn.device)[:, None], :, labelled - 1]  # (n, Q, H, L)
    return spread_loss(rows[..., vision], targets)


def _vision_draw(bank, batch: int, seed: int):
    """Step-seeded vision warm-up batches: ``2 * batch`` one-clip videos of any of the 10 classes (pixel values,
    patch labels)."""
    def draw(step: int) -> list[torch.Tensor]:
        videos = D.make_videos(bank, 2 * batch, step_generator(seed, step), palette=(10, 10), clips=(1, 1))
        return [D.pixel_values_videos(videos), patch_labels(videos)]
    return draw


def _question_draw(tok, bank, batch: int, seed: int, palette: tuple[int, int], per_video: dict[str, int]):
    """Step-seeded packed question batches (:mod:`recipes._video_pack`; so a resumed run draws what an
    uninterrupted one would). All videos of a batch have the same number of clips (1 or 2, drawn per
    batch), so no step pays for padding a 1-clip row to a 2-clip one."""
    def draw(step: int) -> list[torch.Tensor]:
        g = step_generator(seed + 1, step)
        c = int(torch.randint(1, D.MAX_CLIPS + 1, (), generator=g))
        videos = D.make_videos(bank, batch, g, palette=palette, clips=(c, c))
        questions = packed_questions(videos, g, per_video)
        ids, mask, position_ids, labels = packed_batch(tok, videos, questions)
        return [D.pixel_values_videos(videos), ids, mask, labels, patch_labels(videos), position_ids,
                tally_targets(videos), attention_targets(videos, questions)]
    return draw


class _VideoTask(StageTask):
    """A stage of the recipe (:class:`recipes._vlm_stages.StageTask`) on ``pixel_values_videos``; question
    batches are packed (a 4-D mask and their position ids, see :mod:`recipes._video_pack`). ``tally > 0``
    adds ``tally`` × the running-tally loss of ``tally_head`` (:mod:`recipes._video_tally`; ``prefix``: the
    prompt's tokens before the first clip)."""

    def __init__(self, *args, tally: float = 0.0, tally_head: torch.nn.Module | None = None, prefix: int = 3,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tally, self.tally_head, self.prefix = tally, tally_head, prefix

    def weights(self) -> dict[str, torch.Tensor]:
        extra = self.tally_head.named_parameters() if self.tally and not self.vision_only else ()
        return super().weights() | {f"tally.{n}": p for n, p in extra}

    def prepare(self, accelerator) -> None:
        super().prepare(accelerator)
        if self.tally_head is not None:
            self.tally_head.to(self.device)

    def encode(self, pixels: torch.Tensor) -> None:
        self.model.model.get_video_features(pixel_values_videos=pixels)

    def answer_loss(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                    *extra: torch.Tensor) -> torch.Tensor:
        position_ids, targets, attn_targets = extra
        out = self.model(input_ids=ids, attention_mask=mask.to(pixels.dtype), position_ids=position_ids,
                         pixel_values_videos=pixels, labels=labels, output_hidden_states=bool(self.tally),
                         output_attentions=bool(self.attn))
        clips = targets.shape[1] // D.FRAMES
        if self.attn:
            vision = vision_positions(clips, self.prefix).to(ids.device)
            layer = out.attentions[min(ATTN_LAYER, len(out.attentions) - 1)][:, :ATTN_HEADS]
            self.extra_terms["attention"] = self.attn * attention_loss(layer, labels, vision, attn_targets)
        if self.tally:
            ends = frame_ends(clips, self.prefix).to(ids.device)
            self.extra_terms["tally"] = self.tally * tally_loss(  # (a smaller model: its last layer)
                self.tally_head, out.hidden_states[min(TALLY_LAYER, len(out.hidden_states) - 1)], ends, targets)
        return out.loss

    def probe_loss(self, feats: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        return probe_loss(self.probe, feats, cells)


def train_video(out: Path, steps: int | None = None, batch: int | None = None, device: str | None = None,
                seed: int = 0, size: str = "base", n_eval: int = 500, lr: float = LR,
                palette: tuple[int, int] = PALETTE, aux: float = AUX, vision_steps: int | None = None,
                tally: float = TALLY, attn: float = ATTN, per_video: dict[str, int] | None = None,
                init: str | Path | None = None, init_note: str = "",
                save_every: int = 0, eval_every: int = 0) -> dict:
    """Train ``digits-video`` into ``out`` and write its model card; returns the metrics.

    Two stages: ``vision_steps`` steps of the vision tower and projector alone on the probe's digit losses
    (:func:`probe_loss`; standing in for the pretrained vision encoder a real video LLM starts from), then
    ``steps`` steps of the whole model on packed questions (``per_video`` of each type about each video,
    :data:`recipes._video_pack.PER_VIDEO` by default; + ``aux`` × the probe's losses, ``tally`` × the running
    tally's and ``attn`` × :func:`attention_loss`).

    ``init``: a saved ``digits-video`` folder to start from instead of random weights (no vision warm-up
    unless ``vision_steps`` is given; ``init_note`` says on the card what the folder was). ``save_every > 0``
    checkpoints each stage under ``out/training`` every that many steps, and a rerun with the same arguments
    continues from there. ``eval_every > 0`` prints held-out accuracy (100 questions a type) every that many
    whole-model steps.

    ``device`` defaults to ``cpu``; ``steps``/``batch`` default to :data:`STEPS`/:data:`BATCH` of that
    device type; ``vision_steps`` to :data:`VISION_STEPS`, scaled by ``steps / STEPS`` when ``steps`` is
    given. ``size="tiny"`` and a small ``n_eval`` (questions per type) are for tests."""
    dev = torch.device(device or "cpu")
    kind = dev.type if dev.type in STEPS else "cpu"
    if vision_steps is None:
        vision_steps = 0 if init else VISION_STEPS[kind] if steps is None else \
            round(steps * VISION_STEPS[kind] / STEPS[kind])
    steps = steps if steps is not None else STEPS[kind]
    batch = batch if batch is not None else BATCH[kind]
    per_video = dict(per_video or PER_VIDEO)
    torch.manual_seed(seed)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t0 = time.time()
    tok = D.build_tokenizer()
    bank = D.digit_bank("train", copies=COPIES, seed=seed)
    heldout = D.heldout_set(tok, n_per_type=n_eval, seed=1234, split="test")
    train_probe = D.heldout_set(tok, n_per_type=max(1, n_eval // 2), seed=4321, split="train")
    model = make_model(size)
    if init:
        from transformers import LlavaOnevisionForConditionalGeneration
        start = LlavaOnevisionForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
        model.load_state_dict(start.state_dict())
    model.to(dev).train()
    # Real video LLMs start from a pretrained vision encoder; here a linear probe on the projector's output
    # (64 tokens a frame -> the digit under each token, or background) gives the vision side that signal from
    # step one. The probe is dropped after training: the saved model is a plain LlavaOnevision model.
    probe = torch.nn.Linear(model.config.text_config.hidden_size, BACKGROUND + 1).to(dev)
    warm, warm_v = min(WARMUP, max(1, steps // 10)), min(WARMUP, max(1, vision_steps // 10))
    common = {"lr": lr, "betas": (0.9, 0.98), "weight_decay": 0.05, "max_grad_norm": 1.0, "seed": seed,
              "cpu": dev.type == "cpu", "mixed_precision": "bf16" if dev.type == "cuda" else "no",
              "save_every": save_every}
    ckpt = Path(out) / "training" if save_every else None
    small = D.heldout_set(tok, n_per_type=100, seed=1234, split="test") if eval_every else None
    probe_acc: dict[str, float] = {}
    # stage 1: the vision tower and projector alone, warm-up then a flat lr; stage 2: the whole model,
    # warm-up then cosine to 5 %. One fit (fresh AdamW) per stage.
    vision = _VideoTask(model, probe, _vision_draw(bank, batch, seed), aux, vision_steps, True, "digits-video", seed)
    t_vision = 0.0
    if vision_steps:
        t_vision = fit(vision, TrainConfig(steps=vision_steps, warmup=warm_v, min_lr_ratio=1.0, batch_size=2 * batch,
                                           **common), out=ckpt and ckpt / "vision", resume=ckpt is not None).seconds
        with vision.hooked():
            probe_acc["after the vision warm-up"] = _probe_accuracy(model, probe, vision.captured, heldout, dev)
    # the running tally (recipes._video_tally): a training-only head on the language model's hidden states
    tally_head = torch.nn.Linear(model.config.text_config.hidden_size, TALLY_OUTPUTS).to(dev)
    whole = _VideoTask(model, probe, _question_draw(tok, bank, batch, seed, palette, per_video), aux, steps, False,
                       "digits-video", seed, evaluate_fn=small and (lambda: evaluate(model, small, dev)),
                       tally=tally, tally_head=tally_head, prefix=len(D.prefix_ids(tok)), attn=attn)
    t_whole = fit(whole, TrainConfig(steps=steps, warmup=warm, min_lr_ratio=0.05, batch_size=batch,
                                     eval_every=eval_every, **common),
                  out=ckpt and ckpt / "whole", resume=ckpt is not None).seconds
    vision_curve, curve, captured = vision.curve, whole.curve, whole.captured
    with whole.hooked():
        probe_acc["at the end"] = _probe_accuracy(model, probe, captured, heldout, dev)
    train_s = t_vision + t_whole
    chance = majority_baseline(heldout)
    acc, metrics = save_and_score(model, tok, out, dev, evaluate, heldout, train_probe, D.QTYPES, chance, n_eval,
                                  "train-digit videos")
    wall = max(time.time() - t0, train_s)  # a resumed run counts the runs before it
    out = Path(out)
    n_params, n_vision, n_text = (metrics[k] for k in ("parameters", "vision tower parameters", "language model parameters"))
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({_threads()})"
    metrics.update({"vision warm-up steps": vision_steps, "steps": steps, "batch": batch, "device": where,
                    "training seconds": round(train_s, 1), "vision warm-up seconds": round(t_vision, 1),
                    "seconds per step (whole model)": round((train_s - t_vision) / steps, 4),
                    "final train loss (language model)": curve[-1][1]})
    metrics.update({f"probe: held-out frame digit accuracy, {k}": v for k, v in probe_acc.items()})
    vc, tc = model.config.vision_config, model.config.text_config
    layout = D.prompt_text("QUESTION", 2).replace(D.VIDEO_TOKEN * D.N_CLIP_TOKENS, f"<video>×{D.N_CLIP_TOKENS}")
    write_card(out, "digits-video",
               "Tiny video LLM (`LlavaOnevisionForConditionalGeneration`: CLIP vision tower, MLP projector, 2×2 "
               "pooling, Llama) that answers questions about short videos of handwritten digits: 16 vision tokens a "
               f"frame, most of them blank background, {D.N_CLIP_TOKENS} per 4-frame clip, up to 2 clips (for "
               "VideoLLM-MoD / vision-token skipping research). `mmskip.zoo.load('digits-video')` returns "
               "`(model, tokenizer)` (float32, eval); build inputs with "
               "`mmskip.zoo.video_data.encode(tokenizer, clips, questions)` or ask with "
               "`video_data.answer(model, tokenizer, clips, questions)`; a streaming loop feeds "
               "`video_data.prefix_ids(tokenizer)`, then `clip_ids(tokenizer)` per clip, then "
               "`question_ids(tokenizer, question)`.",
               f"Videos: 1 or 2 clips of {D.FRAMES} frames, 32×32 grey (3 equal channels, [-1, 1]); each frame shows "
               "one scikit-learn 8×8 digit upscaled ×2 (16×16) at a random position on a blank frame. Each video "
               f"draws its frames' digits from a random palette of classes ({palette[0]}-{palette[1]} in training, "
               "2-5 in the held-out set). Train videos use the zoo's train digits "
               f"(+ {COPIES - 1} lightly augmented copies), held-out videos only the 300 held-out digits (split of "
               "`mmskip.zoo.data`). Questions (one answer token, then `</s>`; frames count from 1 across clips): "
               "`what digit is in frameK ?` (0-9), `how many frames show D ?` (0-8; D is in the video 3/4 of the "
               "time), `which frame shows D first ?` (1-8; D is one of the video's digits), `is D in frames ?` (1 if "
               "some frame shows D, else 0; D is in the video half of the time). The held-out set asks each question "
               "about its own video; training rows are packed: "
               + ", ".join(f"{k} {t}" for t, k in per_video.items()) + " questions about each video, each question "
               "seeing the video and itself only (a 4-D attention mask, positions restarting after the video, so "
               "each is computed as its own one-question prompt). "
               f"Prompt (2 clips): `{layout}` (after `<s>`); each clip is one video of `pixel_values_videos` "
               f"(`(clips, {D.FRAMES}, 3, 32, 32)`). Word-level tokenizer ({len(tok)} tokens). Generated from "
               f"seeds (train stream seed {seed}, held-out seed 1234); nothing is shipped.",
               f"Vision: CLIP, {vc.num_hidden_layers} layers, d={vc.hidden_size}, patch {vc.patch_size} on "
               f"{vc.image_size}×{vc.image_size} (64 tokens + CLS, CLS dropped; last layer's features). Projector: "
               "2-layer GELU MLP, then LlavaOnevision's 2×2 bilinear pooling (16 tokens a frame) and one learnt "
               f"`image_newline` token per clip. Text: Llama, {tc.num_hidden_layers} layers, d={tc.hidden_size}, "
               f"{tc.num_attention_heads} heads, SwiGLU {tc.intermediate_size}, sdpa. {n_params / 1e6:.2f}M "
               f"parameters (vision {n_vision / 1e6:.2f}M, text {n_text / 1e6:.2f}M), "
               + (f"initialised from {init_note or init}. " if init else "all trained from scratch. ") +
               "A training-only linear probe on the projector's output (not saved) stands in for the pretrained "
               "vision encoder a real video LLM starts from: its loss is a per-patch digit loss (each of a frame's 64 "
               "patch tokens -> the frame's digit if the patch centre lies on the 16×16 digit, else background) plus "
               "a frame loss (the mean of the frame's 64 tokens -> its digit). "
               + (f"Stage 1, vision warm-up: {vision_steps} steps of the vision tower + projector alone on the probe's "
                  f"loss ({2 * batch} one-clip videos a step, {warm_v} warm-up steps, then flat). Stage 2: "
                  if vision_steps else "No vision warm-up. ") +
               f"{steps} steps of the whole model, batch "
               f"{batch} videos (all 1-clip or all 2-clip in a step), loss on the answer token and `</s>` + {aux} × the "
               "probe's loss"
               + (f" + {tally} × a running-tally loss (a training-only linear head, not saved, on the language "
                  f"model's hidden state after layer {TALLY_LAYER} at the last token of each frame: for each digit "
                  "0-9, how many frames so far show it and which frame showed it first)" if tally else "")
               + (f" + {attn} × a training-only attention loss (decoder layer {ATTN_LAYER}, heads 0-{ATTN_HEADS - 1}: "
                  "the position that predicts each answer is taught to spread its attention evenly over the vision "
                  "tokens that show a digit in the frames its answer reads: the frame a digit question names, the "
                  "earliest frame showing the digit for a first-frame question, every frame for count and any)"
                  if attn else "")
               + f", {warm} warm-up steps, cosine to 5 %. AdamW lr {lr} (β 0.9/0.98, wd 0.05 on "
               f"matrices; a fresh AdamW per stage, each one `mmskip.train.fit`), grad clip 1"
               f"{', bf16 autocast' if dev.type == 'cuda' else ''}. Saved in fp16.",
               metrics, wall,
               extra="\nAccuracy is greedy (argmax) on the answer token. Majority-answer baseline = always giving "
               "the most frequent answer of that question type (chance level). The probe rows measure the vision "
               "side alone: how often the training probe reads a held-out frame's digit from its tokens.\n\n"
               + ("## Vision warm-up loss (step, probe loss)\n" + ", ".join(f"{s}: {v}" for s, v in vision_curve)
                  + "\n\n" if vision_curve else "") +
               "## Training loss (step, language-model loss on answer + `</s>`; probe loss excluded)\n"
               + ", ".join(f"{s}: {v}" for s, v in curve) + "\n")
    card = out / "README.md"
    text = re.sub(r"^Training wall time: .*$", f"Training wall time: {wall / 60:.1f} min in all ({train_s / 60:.1f} min "
                  f"of training steps) on {where}.", card.read_text(), flags=re.M)
    threads = "" if dev.type == "cuda" or torch.get_num_threads() == 1 else f" --threads {torch.get_num_threads()}"
    cmd = (f"mmskip zoo digits-video{' --device cuda' if dev.type == 'cuda' else ''}"
           f"{'' if steps == STEPS[kind] else f' --steps {steps}'}{'' if batch == BATCH[kind] else f' --batch {batch}'}"
           f"{threads}")
    how = f"`{cmd}`"
    if init:
        how = (f"`recipes.video.train_video(out, steps={steps}, batch={batch}"
               f"{f', device={dev.type!r}' if dev.type != 'cpu' else ''}, init=FOLDER)`, FOLDER holding "
               f"{init_note or init}")
    text = re.sub(r"^Reproduce: .*$", f"Reproduce: {how} (fixed seeds; bf16 on a GPU, so not bit-exact).",
                  text, flags=re.M)
    card.write_text(text)
    print(f"held-out accuracy: {acc}  (majority baseline {chance})")
    return metrics
