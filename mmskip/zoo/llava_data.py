"""Data and prompts for ``digits-llava``: questions about 4×4 grids of scikit-learn digits.

An image is a 4×4 grid of 8×8 digits (the zoo's shared split, see :mod:`mmskip.zoo.data`: train grids
use train digits only, held-out grids the 300 held-out digits only) -> 32×32 grey, given to the model
as 3 equal channels in [-1, 1]. With patch 4 the vision tower sees 64 patches, each digit covering a
2×2 block of them, so answers need the right vision tokens:

* ``digit``: ``what digit is in rowR columnC ?`` -> ``0``..``9`` (needs that cell's 4 tokens);
* ``count``: ``how many D are there ?`` -> ``0``..``16`` (needs every cell);
* ``sum``: ``what is the sum of rowR ?`` / ``... of columnC ?`` -> ``0``..``36`` (needs one row/column).

Rows and columns count from 1 (top, left); ``row1``..``row4`` and ``column1``..``column4`` are single
words (one token each: easier to learn than ``row`` + number). A prompt is LLaVA-1.5-shaped:
``<s> USER : <image>×64 QUESTION ASSISTANT :`` and the answer is one token followed by ``</s>``.
The tokenizer is word-level (:func:`build_tokenizer`); every answer is a single token.
Use :func:`encode` to turn ``(images, questions)`` into model inputs and :func:`answer` to ask.
Everything is generated from seeds, nothing is shipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .word_tokenizer import answer_batch, word_tokenizer

__all__ = ["GRID", "CELL", "IMAGE_SIZE", "PATCH", "N_IMAGE_TOKENS", "QTYPES", "IMAGE_TOKEN", "PALETTE", "COPIES", "Batch",
           "build_tokenizer", "digit_bank", "make_grids", "render", "pixel_values", "prompt_text", "ask",
           "question_cells", "sample_questions", "make_batch", "heldout_set", "encode", "answer"]

GRID = 4
CELL = 8
IMAGE_SIZE = GRID * CELL  # 32
PATCH = 4
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # 64
QTYPES = ("digit", "count", "sum")
IMAGE_TOKEN = "<image>"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN]
WORDS = (["USER", "ASSISTANT", ":", "?", "what", "digit", "is", "in", "how", "many", "are", "there", "the", "sum",
          "of"] + [f"row{i}" for i in range(1, GRID + 1)] + [f"column{i}" for i in range(1, GRID + 1)])
IMAGE_FIRST = True  # LLaVA order (image, then question); False puts the question before the image
NUMBERS = [str(i) for i in range(9 * GRID + 1)]  # 0..36: the largest row sum
# the digits-llava recipe's training data (also what p-MoD routers train on)
PALETTE = (1, 10)  # training grids use 1-10 digit classes: 1-class grids teach recognition before lookup
COPIES = 8  # train digits: the originals + 7 augmented copies


def build_tokenizer():
    """The word-level ``PreTrainedTokenizerFast`` (adds ``<s>``; ``<image>`` is a special token)."""
    return word_tokenizer(SPECIALS, WORDS + NUMBERS, max_length=256)


def digit_bank(split: str, copies: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(digits (N, 8, 8) in [0, 1], labels (N,))`` of the zoo split. ``copies > 1`` adds lightly augmented
    copies (rotated/scaled/shifted at 32×32, area-pooled back to 8×8 like scikit-learn made the originals)."""
    from .data import augment, load_split

    x8, y = load_split(split, size=CELL)  # size 8: the original 8×8 images, scaled to [-1, 1]
    out = [(x8[:, 0] + 1) / 2]
    if copies > 1:
        x32, _ = load_split(split, size=32)
        g = torch.Generator().manual_seed(seed)
        for _ in range(copies - 1):
            xa = (augment(x32, g, strength=0.8) + 1) / 2
            out.append(F.avg_pool2d(xa, 4)[:, 0])
    return torch.cat(out).clamp(0, 1).contiguous(), y.repeat(copies)


def make_grids(bank: tuple[torch.Tensor, torch.Tensor], n: int, g: torch.Generator,
               palette: tuple[int, int] = (3, 10)) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random grids -> ``(images (n, 32, 32) in [0, 1], labels (n, 4, 4))``.

    Each grid draws its cells from a random palette of ``palette[0]``-``palette[1]`` digit classes (so
    counts vary more than with uniform cells) and, per cell, a random bank image of that class."""
    x, y = bank
    by_class = [torch.nonzero(y == d).flatten() for d in range(10)]
    k = torch.randint(palette[0], palette[1] + 1, (n,), generator=g)
    palettes = torch.argsort(torch.rand(n, 10, generator=g), dim=1)  # first k[i] columns = grid i's palette
    pick = (torch.rand(n, GRID * GRID, generator=g) * k[:, None]).long()
    labels = torch.gather(palettes, 1, pick)
    idx = torch.empty_like(labels)
    for d in range(10):
        m = labels == d
        cnt = int(m.sum())
        if cnt:
            idx[m] = by_class[d][torch.randint(0, len(by_class[d]), (cnt,), generator=g)]
    return render(x[idx]), labels.view(n, GRID, GRID)


def render(cells: torch.Tensor) -> torch.Tensor:
    """``(n, 16, 8, 8)`` cell images (row-major) -> ``(n, 32, 32)`` grid images."""
    n = cells.shape[0]
    return cells.view(n, GRID, GRID, CELL, CELL).permute(0, 1, 3, 2, 4).reshape(n, IMAGE_SIZE, IMAGE_SIZE)


def pixel_values(images: torch.Tensor) -> torch.Tensor:
    """Grid images in [0, 1], ``(n, 32, 32)``, ``(n, 1, 32, 32)`` or ``(n, 3, 32, 32)`` -> ``(n, 3, 32, 32)``
    in [-1, 1] (the model's ``pixel_values``)."""
    if images.dim() == 3:
        images = images[:, None]
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return (images.float() * 2 - 1).contiguous()


def prompt_text(question: str) -> str:
    """The prompt for ``question`` (the ``<s>`` is added by the tokenizer)."""
    if not IMAGE_FIRST:
        return f"USER : {question} {IMAGE_TOKEN * N_IMAGE_TOKENS} ASSISTANT :"
    return f"USER : {IMAGE_TOKEN * N_IMAGE_TOKENS} {question} ASSISTANT :"


def ask(labels: torch.Tensor, qtype: str, a: int, b: int = 0) -> tuple[str, str]:
    """``(question, answer)`` of type ``qtype`` about the grid with ``labels`` (4×4).

    ``digit``: ``a``, ``b`` = row, column (0-based); ``count``: ``a`` = the digit; ``sum``: ``a`` = index
    (0-based), ``b`` = 0 for a row, 1 for a column."""
    if qtype == "digit":
        return f"what digit is in row{a + 1} column{b + 1} ?", str(int(labels[a, b]))
    if qtype == "count":
        return f"how many {a} are there ?", str(int((labels == a).sum()))
    if qtype == "sum":
        line = labels[a, :] if b == 0 else labels[:, a]
        return f"what is the sum of {'row' if b == 0 else 'column'}{a + 1} ?", str(int(line.sum()))
    raise ValueError(f"unknown question type {qtype!r}; one of {QTYPES}")


def question_cells(question: str) -> torch.Tensor:
    """The cells a question's answer depends on, ``(4, 4)`` booleans: one cell for ``digit``, a row or a
    column for ``sum``, every cell for ``count`` (and for a question this module did not ask)."""
    cells = torch.zeros(GRID, GRID, dtype=torch.bool)
    names = [w for w in question.split() if w.startswith(("row", "column"))]
    rows = [int(w[3:]) - 1 for w in names if w.startswith("row")]
    cols = [int(w[6:]) - 1 for w in names if w.startswith("column")]
    if rows and cols:
        cells[rows[0], cols[0]] = True
    elif rows:
        cells[rows[0]] = True
    elif cols:
        cells[:, cols[0]] = True
    else:
        cells[:] = True
    return cells


def sample_questions(labels: torch.Tensor, g: torch.Generator, qtypes: list[str] | None = None,
                     weights: tuple[float, ...] = (0.5, 0.25, 0.25)) -> tuple[list[str], list[str], list[str]]:
    """One random question per grid -> ``(questions, answers, qtypes)``. ``count`` asks about a digit
    of the grid half the time, about a random digit otherwise."""
    n = labels.shape[0]
    if qtypes is None:
        qtypes = [QTYPES[i] for i in torch.multinomial(torch.tensor(weights), n, True, generator=g).tolist()]
    r = torch.randint(0, GRID, (n, 2), generator=g).tolist()
    coin = torch.randint(0, 2, (n,), generator=g).tolist()
    rand_digit = torch.randint(0, 10, (n,), generator=g).tolist()
    qs, ans = [], []
    for i, t in enumerate(qtypes):
        if t == "digit":
            q = ask(labels[i], t, r[i][0], r[i][1])
        elif t == "count":
            q = ask(labels[i], t, int(labels[i, r[i][0], r[i][1]]) if coin[i] else rand_digit[i])
        else:
            q = ask(labels[i], t, r[i][0], coin[i])
        qs.append(q[0])
        ans.append(q[1])
    return qs, ans, list(qtypes)


@dataclass
class Batch:
    pixel_values: torch.Tensor  # (n, 3, 32, 32)
    input_ids: torch.Tensor  # (n, L) right-padded: prompt, answer, </s>, <pad>...
    attention_mask: torch.Tensor
    labels: torch.Tensor  # -100 except the answer and </s>
    answer_pos: torch.Tensor  # (n,) index of the answer token in input_ids
    qtypes: list[str]
    questions: list[str]
    answers: list[str]

    def to(self, device) -> Batch:
        t = {k: getattr(self, k).to(device, non_blocking=True)
             for k in ("pixel_values", "input_ids", "attention_mask", "labels", "answer_pos")}
        return Batch(**t, qtypes=self.qtypes, questions=self.questions, answers=self.answers)


def make_batch(tokenizer, images: torch.Tensor, questions: list[str], answers: list[str], qtypes: list[str]) -> Batch:
    """Teacher-forced training/eval batch (right-padded, loss on the answer token and ``</s>``)."""
    vocab = tokenizer.get_vocab()  # prompts are space-separated words: same ids as tokenizer(prompt_text(q))
    head = tokenizer(prompt_text("?"))["input_ids"]
    split = head.index(vocab["?"])
    prompts = [head[:split] + [vocab[w] for w in q.split()] + head[split + 1:] for q in questions]
    ans_ids = [vocab[a] for a in answers]
    seqs = [p + [a, tokenizer.eos_token_id] for p, a in zip(prompts, ans_ids, strict=True)]
    ids, mask, labels, pos = answer_batch(seqs, tokenizer.pad_token_id)
    return Batch(pixel_values(images), ids, mask, labels, pos, qtypes, questions, answers)


def heldout_set(tokenizer, n_per_type: int = 500, seed: int = 1234, split: str = "test") -> Batch:
    """The fixed held-out evaluation set: ``n_per_type`` questions of each type on grids of held-out digits
    (palettes of 3-10 classes; training also shows easier 1-2-class grids)."""
    g = torch.Generator().manual_seed(seed)
    bank = digit_bank(split)
    images, labels = make_grids(bank, n_per_type * len(QTYPES), g, palette=(3, 10))
    qtypes = [t for t in QTYPES for _ in range(n_per_type)]
    qs, ans, qtypes = sample_questions(labels, g, qtypes)
    return make_batch(tokenizer, images, qs, ans, qtypes)


def encode(tokenizer, images: torch.Tensor, questions: list[str] | str) -> dict[str, torch.Tensor]:
    """Model inputs (``input_ids``, ``attention_mask`` left-padded for generation, ``pixel_values``) for
    grid images in [0, 1] (see :func:`pixel_values`) and one question per image."""
    if isinstance(questions, str):
        questions = [questions]
    enc = tokenizer([prompt_text(q) for q in questions], padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "pixel_values": pixel_values(images)}


@torch.no_grad()
def answer(model, tokenizer, images: torch.Tensor, questions: list[str] | str) -> list[str]:
    """Greedy one-token answers of ``model`` (``LlavaForConditionalGeneration``) to ``questions``."""
    inputs = encode(tokenizer, images, questions)
    dev = next(model.parameters()).device
    inputs = {k: v.to(dev) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
    out = model.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
