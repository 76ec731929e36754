"""The zoo's word-level tokenizers (digits-llava, digits-video, digits-florence) and their chance level.

One vocabulary word per token, whitespace pre-tokenizer, ``<s>`` (and optionally ``</s>``) added by
the template; small enough that every answer is one token.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

__all__ = ["word_tokenizer", "majority_baseline", "answer_batch"]


def word_tokenizer(specials: Sequence[str], words: Sequence[str], *, eos: bool = False, max_length: int = 256,
                   padding_side: str = "left"):
    """A ``PreTrainedTokenizerFast`` over ``specials + words`` (ids in that order). ``specials`` must hold
    ``<pad> <s> </s> <unk>``; the template adds ``<s>`` before a sequence (and ``</s>`` after it with
    ``eos``); the decoder joins words with spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*specials, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(list(specials))
    marks = [("<s>", vocab["<s>"])] + ([("</s>", vocab["</s>"])] if eos else [])
    end = " </s>" if eos else ""
    tok.post_processor = processors.TemplateProcessing(single=f"<s> $A{end}", pair=f"<s> $A{end} $B{end}",
                                                       special_tokens=marks)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=max_length, padding_side=padding_side)


def majority_baseline(answers: Sequence[str], kinds: Sequence[str], order: Sequence[str]) -> dict[str, float]:
    """Per kind (question type or task, in ``order``): the accuracy of always giving its most frequent
    answer, the chance level a model card reports beside the model's accuracy."""
    res = {}
    for t in order:
        picked = [a for a, k in zip(answers, kinds, strict=True) if k == t]
        if picked:
            res[t] = Counter(picked).most_common(1)[0][1] / len(picked)
    return res


def answer_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded teacher-forcing tensors for ``prompt + [answer, </s>]`` sequences:
    ``(input_ids, attention_mask, labels, answer_pos)``, the loss on the answer token and ``</s>``."""
    width = max(map(len, seqs))
    ids = torch.tensor([list(s) + [pad_id] * (width - len(s)) for s in seqs], dtype=torch.long)
    labels = torch.full_like(ids, -100)
    lens = torch.tensor([len(s) for s in seqs])
    col = torch.arange(width)
    mask = (col < lens[:, None]).long()
    tail = (col >= lens[:, None] - 2) & (mask == 1)
    labels[tail] = ids[tail]
    return ids, mask, labels, lens - 2
