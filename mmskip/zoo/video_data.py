"""Data and prompts for ``digits-video``: questions about short videos of scikit-learn digits.

A clip is :data:`FRAMES` (4) frames of 32×32 grey; each frame shows ONE 8×8 digit upscaled ×2 (16×16) at
a random position, the rest is blank (the zoo's shared split, see :mod:`mmskip.zoo.data`: train videos use
train digits only, held-out videos the 300 held-out digits only). A video is 1 or 2 clips (4 or 8 frames),
and each clip is one video of ``pixel_values_videos`` (``(clips, 4, 3, 32, 32)``, 3 equal channels in
[-1, 1]). ``LlavaOnevisionForConditionalGeneration`` turns a frame into 64 patch tokens, projects them and
pools 2×2 -> :data:`TOKENS_PER_FRAME` (16) tokens, most of them background (the redundancy VideoLLM-MoD
exploits), and appends one ``image_newline`` token per clip: :data:`N_CLIP_TOKENS` = 4 × 16 + 1 = 65
``<video>`` tokens per clip. Frames count from 1 across the clips (frame5 is clip 2's first frame):

* ``digit``: ``what digit is in frameK ?`` -> ``0``..``9`` (needs that frame's 16 tokens);
* ``count``: ``how many frames show D ?`` -> ``0``..``8`` (needs every frame);
* ``first``: ``which frame shows D first ?`` -> ``1``..``8`` (D is shown; needs the frames up to it);
* ``any``: ``is D in frames ?`` -> ``1`` (some frame shows D) or ``0`` (none does; needs every frame).

``frame1``..``frame8`` are single words. The prompt layout is a contract (a streaming loop feeds the parts
one at a time, see :func:`prefix_ids`, :func:`clip_ids`, :func:`question_ids`)::

    <s> USER :  <video>×65 [<video>×65]  QUESTION ASSISTANT :  ANSWER </s>

The tokenizer is word-level (:func:`build_tokenizer`); every answer is one token. Use :func:`encode` to turn
``(clips, questions)`` into model inputs and :func:`answer` to ask. Everything is generated from seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .llava_data import digit_bank
from .word_tokenizer import answer_batch, word_tokenizer

__all__ = ["FRAMES", "MAX_CLIPS", "FRAME_SIZE", "DIGIT_SIZE", "PATCH", "TOKENS_PER_FRAME", "N_CLIP_TOKENS",
           "QTYPES", "PALETTE", "COPIES", "VIDEO_TOKEN", "IMAGE_TOKEN", "Videos", "Batch", "build_tokenizer", "digit_bank", "make_videos",
           "render", "pixel_values_videos", "n_video_tokens", "prompt_text", "prefix_ids", "clip_ids", "question_ids",
           "prompt_ids", "ask", "question_frames", "sample_questions", "make_batch", "heldout_set", "encode", "answer"]

FRAMES = 4  # frames per clip
MAX_CLIPS = 2
FRAME_SIZE = 32
DIGIT_SIZE = 16  # an 8×8 digit upscaled ×2
PATCH = 4
TOKENS_PER_FRAME = ((FRAME_SIZE // PATCH + 1) // 2) ** 2  # 8×8 patches, pooled 2×2 (ceil) -> 16
N_CLIP_TOKENS = FRAMES * TOKENS_PER_FRAME + 1  # + one image_newline token per clip: 65
QTYPES = ("digit", "count", "first", "any")
VIDEO_TOKEN = "<video>"
IMAGE_TOKEN = "<image>"  # in the vocabulary for LlavaOnevision's config; never used
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN, VIDEO_TOKEN]
WORDS = (["USER", "ASSISTANT", ":", "?", "what", "digit", "is", "in", "how", "many", "frames", "show", "which",
          "frame", "shows", "first"] + [f"frame{i}" for i in range(1, MAX_CLIPS * FRAMES + 1)])
NUMBERS = [str(i) for i in range(10)]  # digits 0-9, counts 0-8, frame numbers 1-8
PALETTE = (1, 5)  # training videos use 1-5 digit classes: 1-class videos teach recognition before lookup
COPIES = 8  # train digits: the originals + 7 augmented copies


def build_tokenizer():
    """The word-level ``PreTrainedTokenizerFast`` (adds ``<s>``; ``<video>`` is a special token)."""
    return word_tokenizer(SPECIALS, WORDS + NUMBERS, max_length=512)


@dataclass
class Videos:
    """``n`` videos of up to :data:`MAX_CLIPS` clips. Clip slots past ``n_clips`` are blank, label -1."""

    frames: torch.Tensor  # (n, MAX_CLIPS, FRAMES, 32, 32) grey in [0, 1]
    labels: torch.Tensor  # (n, MAX_CLIPS, FRAMES) digit of each frame, -1 in unused clip slots
    positions: torch.Tensor  # (n, MAX_CLIPS, FRAMES, 2) top-left (row, column) of the 16×16 digit
    n_clips: torch.Tensor  # (n,)

    def __len__(self) -> int:
        return self.frames.shape[0]

    def __getitem__(self, i) -> Videos:
        if isinstance(i, int):
            i = slice(i, i + 1)
        return Videos(self.frames[i], self.labels[i], self.positions[i], self.n_clips[i])

    def clips(self) -> list[torch.Tensor]:
        """One ``(n_clips, FRAMES, 32, 32)`` tensor per video (the ``clips`` argument of :func:`encode`)."""
        return [f[:int(c)] for f, c in zip(self.frames, self.n_clips, strict=True)]


def render(digits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``(m, 8, 8)`` digits in [0, 1] and ``(m, 2)`` top-left positions (0..16) -> ``(m, 32, 32)`` frames,
    each digit upscaled ×2 (bilinear) on a blank frame."""
    m = digits.shape[0]
    big = F.interpolate(digits[:, None].float(), scale_factor=DIGIT_SIZE // digits.shape[-1], mode="bilinear",
                        align_corners=False)[:, 0].clamp(0, 1)
    out = torch.zeros(m, FRAME_SIZE, FRAME_SIZE)
    ar = torch.arange(DIGIT_SIZE)
    rows = (positions[:, 0, None] + ar)[:, :, None]
    cols = (positions[:, 1, None] + ar)[:, None, :]
    out[torch.arange(m)[:, None, None], rows, cols] = big
    return out


def make_videos(bank: tuple[torch.Tensor, torch.Tensor], n: int, g: torch.Generator,
                palette: tuple[int, int] = (2, 5), clips: tuple[int, int] = (1, MAX_CLIPS)) -> Videos:
    """``n`` random videos of ``clips[0]``-``clips[1]`` clips. Each video draws its frames' digits from a random
    palette of ``palette[0]``-``palette[1]`` classes (so digits repeat across frames and counts vary), a random
    bank image of that class per frame, at a random position."""
    x, y = bank
    by_class = [torch.nonzero(y == d).flatten() for d in range(10)]
    slots = MAX_CLIPS * FRAMES
    n_clips = torch.randint(clips[0], clips[1] + 1, (n,), generator=g)
    k = torch.randint(palette[0], palette[1] + 1, (n,), generator=g)
    palettes = torch.argsort(torch.rand(n, 10, generator=g), dim=1)  # first k[i] columns = video i's palette
    pick = (torch.rand(n, slots, generator=g) * k[:, None]).long()
    labels = torch.gather(palettes, 1, pick)
    idx = torch.empty_like(labels)
    for d in range(10):
        m = labels == d
        cnt = int(m.sum())
        if cnt:
            idx[m] = by_class[d][torch.randint(0, len(by_class[d]), (cnt,), generator=g)]
    pos = torch.randint(0, FRAME_SIZE - DIGIT_SIZE + 1, (n, slots, 2), generator=g)
    frames = render(x[idx.flatten()], pos.view(-1, 2)).view(n, MAX_CLIPS, FRAMES, FRAME_SIZE, FRAME_SIZE)
    used = (torch.arange(MAX_CLIPS)[None] < n_clips[:, None])  # (n, MAX_CLIPS)
    frames = frames * used[:, :, None, None, None]
    labels = labels.view(n, MAX_CLIPS, FRAMES).masked_fill(~used[:, :, None], -1)
    return Videos(frames.contiguous(), labels, pos.view(n, MAX_CLIPS, FRAMES, 2), n_clips)


def _clip_list(clips) -> list[torch.Tensor]:
    """``clips`` as one ``(n_clips, F, H, W)`` tensor per video (see :func:`encode`)."""
    if isinstance(clips, Videos):
        return clips.clips()
    if isinstance(clips, torch.Tensor):
        if clips.dim() == 4:  # (n, F, H, W): one clip per video
            return [c[None] for c in clips]
        if clips.dim() == 5:  # (n, C, F, H, W)
            return list(clips)
        raise ValueError(f"clips tensor must be (n, F, H, W) or (n, C, F, H, W), got {tuple(clips.shape)}")
    return [c[None] if c.dim() == 3 else c for c in clips]


def pixel_values_videos(clips) -> torch.Tensor:
    """Clips in [0, 1] (see :func:`encode`) -> ``(total clips, F, 3, 32, 32)`` in [-1, 1], the clips of each
    video in order, videos in order (the model's ``pixel_values_videos``)."""
    c = torch.cat(_clip_list(clips))
    if c.dim() == 4:  # grey (clips, F, H, W)
        c = c[:, :, None]
    if c.shape[2] == 1:
        c = c.expand(-1, -1, 3, -1, -1)
    return (c.float() * 2 - 1).contiguous()


def n_video_tokens(n_frames: int = FRAMES) -> int:
    """``<video>`` tokens of one clip of ``n_frames`` frames: 16 per frame + one ``image_newline``."""
    return n_frames * TOKENS_PER_FRAME + 1


def prompt_text(question: str, n_clips: int = 1, n_frames: int = FRAMES) -> str:
    """The prompt for ``question`` about a video of ``n_clips`` clips (the ``<s>`` is added by the tokenizer)."""
    clips = " ".join([VIDEO_TOKEN * n_video_tokens(n_frames)] * n_clips)
    return f"USER : {clips} {question} ASSISTANT :"


def prefix_ids(tokenizer) -> list[int]:
    """The prompt's head, ``<s> USER :`` (fed before the first clip)."""
    return [tokenizer.bos_token_id] + tokenizer.convert_tokens_to_ids(["USER", ":"])


def clip_ids(tokenizer, n_frames: int = FRAMES) -> list[int]:
    """One clip's placeholders, ``<video>`` × (``n_frames`` × 16 + 1) (the last one is the clip's
    ``image_newline``); the model fills them with that clip's features."""
    return [tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)] * n_video_tokens(n_frames)


def question_ids(tokenizer, question: str) -> list[int]:
    """The prompt's tail, `` QUESTION ASSISTANT :`` (fed after the last clip; the answer comes next)."""
    ids = tokenizer.convert_tokens_to_ids(question.split() + ["ASSISTANT", ":"])
    if tokenizer.unk_token_id in ids:
        raise ValueError(f"question {question!r} has words outside the vocabulary")
    return ids


def prompt_ids(tokenizer, question: str, n_clips: int = 1, n_frames: int = FRAMES) -> list[int]:
    """``prefix_ids + clip_ids × n_clips + question_ids``: the ids of ``tokenizer(prompt_text(...))``."""
    return prefix_ids(tokenizer) + clip_ids(tokenizer, n_frames) * n_clips + question_ids(tokenizer, question)


def ask(labels: torch.Tensor, qtype: str, a: int) -> tuple[str, str]:
    """``(question, answer)`` of type ``qtype`` about a video whose frames show ``labels`` (1-D, in order;
    -1 entries are ignored). ``digit``: ``a`` = frame (0-based); ``count``, ``first``, ``any``: ``a`` = the digit."""
    labels = labels[labels >= 0]
    if qtype == "digit":
        return f"what digit is in frame{a + 1} ?", str(int(labels[a]))
    if qtype == "count":
        return f"how many frames show {a} ?", str(int((labels == a).sum()))
    if qtype == "first":
        hit = torch.nonzero(labels == a).flatten()
        if not len(hit):
            raise ValueError(f"digit {a} is not in the video; 'first' questions ask about shown digits")
        return f"which frame shows {a} first ?", str(int(hit[0]) + 1)
    if qtype == "any":
        return f"is {a} in frames ?", str(int(bool((labels == a).any())))
    raise ValueError(f"unknown question type {qtype!r}; one of {QTYPES}")


def question_frames(question: str, n_frames: int) -> torch.Tensor:
    """The frames of an ``n_frames``-frame video a question's answer depends on, ``(n_frames,)`` booleans: the
    frame a ``digit`` question names, every frame for the others."""
    frames = torch.zeros(n_frames, dtype=torch.bool)
    named = [int(w[5:]) - 1 for w in question.split() if w.startswith("frame") and w[5:].isdigit()]
    if named:
        frames[named[0]] = True
    else:
        frames[:] = True
    return frames


def sample_questions(videos: Videos, g: torch.Generator, qtypes: list[str] | None = None,
                     weights: tuple[float, ...] = (0.4, 0.2, 0.2, 0.2)) -> tuple[list[str], list[str], list[str]]:
    """One random question per video -> ``(questions, answers, qtypes)``. ``digit`` asks about a random frame;
    ``count`` about a digit of the video 3/4 of the time, a random digit otherwise (so ``0`` is not the usual
    answer); ``first`` about one of the video's distinct digits (uniformly, so the answer is not mostly ``1``);
    ``any`` about one of the video's digits half of the time, else about a digit it does not show (so
    ``1`` and ``0`` are equally likely)."""
    n = len(videos)
    if qtypes is None:
        qtypes = [QTYPES[i] for i in torch.multinomial(torch.tensor(weights), n, True, generator=g).tolist()]
    u = torch.rand(n, 3, generator=g).tolist()
    rand_digit = torch.randint(0, 10, (n,), generator=g).tolist()
    absent = torch.rand(n, 10, generator=g)  # ranks the digits a video does not show, for ``any``
    qs, ans = [], []
    for i, t in enumerate(qtypes):
        lab = videos.labels[i].flatten()
        lab = lab[lab >= 0]
        if t == "digit":
            q = ask(lab, t, int(u[i][0] * len(lab)))
        elif t == "count":
            q = ask(lab, t, int(lab[int(u[i][0] * len(lab))]) if u[i][2] < 0.75 else rand_digit[i])
        elif t == "first":
            shown = torch.unique(lab)
            q = ask(lab, t, int(shown[int(u[i][1] * len(shown))]))
        elif t == "any":
            if u[i][2] < 0.5:
                q = ask(lab, t, int(lab[int(u[i][0] * len(lab))]))
            else:
                r = absent[i].clone()
                r[torch.unique(lab)] = -1.0
                q = ask(lab, t, int(r.argmax()))
        else:
            raise ValueError(f"unknown question type {t!r}; one of {QTYPES}")
        qs.append(q[0])
        ans.append(q[1])
    return qs, ans, list(qtypes)


@dataclass
class Batch:
    videos: Videos
    input_ids: torch.Tensor  # (n, L) right-padded: prompt, answer, </s>, <pad>...
    attention_mask: torch.Tensor
    labels: torch.Tensor  # -100 except the answer and </s>
    answer_pos: torch.Tensor  # (n,) index of the answer token in input_ids
    qtypes: list[str]
    questions: list[str]
    answers: list[str]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: slice) -> Batch:
        return Batch(self.videos[i], self.input_ids[i], self.attention_mask[i], self.labels[i], self.answer_pos[i],
                     self.qtypes[i], self.questions[i], self.answers[i])

    @property
    def pixel_values_videos(self) -> torch.Tensor:
        """``(total clips, F, 3, 32, 32)`` in [-1, 1] (on the device of ``videos``)."""
        return pixel_values_videos(self.videos)


def make_batch(tokenizer, videos: Videos, questions: list[str], answers: list[str], qtypes: list[str]) -> Batch:
    """Teacher-forced training/eval batch (right-padded, loss on the answer token and ``</s>``)."""
    vocab = tokenizer.get_vocab()
    seqs = [prompt_ids(tokenizer, q, int(c)) + [vocab[a], tokenizer.eos_token_id]
            for q, a, c in zip(questions, answers, videos.n_clips, strict=True)]
    ids, mask, labels, pos = answer_batch(seqs, tokenizer.pad_token_id)
    return Batch(videos, ids, mask, labels, pos, list(qtypes), list(questions), list(answers))


def heldout_set(tokenizer, n_per_type: int = 500, seed: int = 1234, split: str = "test") -> Batch:
    """The fixed held-out evaluation set: ``n_per_type`` questions of each type on 1-2-clip videos of held-out
    digits (palettes of 2-5 classes; training also shows 1-class videos)."""
    g = torch.Generator().manual_seed(seed)
    videos = make_videos(digit_bank(split), n_per_type * len(QTYPES), g, palette=(2, 5))
    qtypes = [t for t in QTYPES for _ in range(n_per_type)]
    qs, ans, qtypes = sample_questions(videos, g, qtypes)
    return make_batch(tokenizer, videos, qs, ans, qtypes)


def encode(tokenizer, clips, questions: list[str] | str) -> dict[str, torch.Tensor]:
    """Model inputs (``input_ids``, ``attention_mask`` left-padded for generation, ``pixel_values_videos``)
    for one question per video.

    ``clips``: a :class:`Videos`, a tensor ``(n, F, 32, 32)`` (one clip per video) or ``(n, C, F, 32, 32)``, or a
    list with one ``(F, 32, 32)`` or ``(C, F, 32, 32)`` tensor per video; grey frames in [0, 1] (a channel
    axis of 1 or 3 after ``F`` is also accepted)."""
    if isinstance(questions, str):
        questions = [questions]
    per_video = _clip_list(clips)
    if len(per_video) != len(questions):
        raise ValueError(f"{len(per_video)} videos but {len(questions)} questions")
    seqs = [prompt_ids(tokenizer, q, len(c), c.shape[1]) for q, c in zip(questions, per_video, strict=True)]
    width = max(map(len, seqs))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(s)) + s for s in seqs], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values_videos": pixel_values_videos(per_video)}


@torch.no_grad()
def answer(model, tokenizer, clips, questions: list[str] | str) -> list[str]:
    """Greedy one-token answers of ``model`` (``LlavaOnevisionForConditionalGeneration``) to ``questions``
    (``clips`` as in :func:`encode`)."""
    inputs = encode(tokenizer, clips, questions)
    p = next(model.parameters())
    inputs = {k: v.to(p.device) for k, v in inputs.items()}
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(p.dtype)
    out = model.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
