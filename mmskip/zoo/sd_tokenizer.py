"""A real ``CLIPTokenizer`` for ``digits-sd``, built from the project's own caption vocabulary.

A byte-level BPE (CLIP conventions: lower-case, ``</w>`` word ends, the 256 byte symbols and their
``</w>`` forms first, ``<|startoftext|>``/``<|endoftext|>`` last) is trained with ``tokenizers``
on the caption templates and written as ``vocab.json`` + ``merges.txt``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .data import DIGIT_NAMES, TEMPLATES

__all__ = ["caption_corpus", "build_clip_tokenizer"]

MAX_LENGTH = 16


def caption_corpus() -> list[str]:
    return [t.format(name=DIGIT_NAMES[d], d=d) for d in range(10) for t in TEMPLATES] + [
        "a handwritten digit", "a digit", "a number", "handwritten digits zero to nine"]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level BPE alphabet: each byte maps to a printable unicode character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def build_clip_tokenizer(out: Path, texts: list[str] | None = None, merges_budget: int = 300):
    """Train the BPE, write ``vocab.json``/``merges.txt`` and return a ``CLIPTokenizer`` saved in ``out``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    texts = texts or caption_corpus()
    alphabet = list(bytes_to_unicode().values())
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=512 + merges_budget, initial_alphabet=alphabet,
                                  end_of_word_suffix="</w>", show_progress=False, min_frequency=1)
    tok.train_from_iterator(texts, trainer=trainer)
    with tempfile.TemporaryDirectory() as tmp:
        tok.model.save(tmp)
        merges = [m for m in Path(tmp, "merges.txt").read_text().splitlines() if m and not m.startswith("#")]
    vocab = alphabet + [a + "</w>" for a in alphabet]
    for m in merges:
        merged = m.replace(" ", "")
        if merged not in vocab:
            vocab.append(merged)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    clip_tok = CLIPTokenizer.from_pretrained(out, model_max_length=MAX_LENGTH, pad_token="<|endoftext|>")
    clip_tok.save_pretrained(out)
    return clip_tok
