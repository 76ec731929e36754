"""``stdlib-lm``'s architecture, tokenizer and the perplexity its model card reports.

The recipes (``recipes/stdlib_lm.py``, ``recipes/stdlib_lm_skip.py``) train these; SkipPipe builds
its decoders with :func:`make_model`; the tests use :func:`perplexity` as an implementation of
perplexity independent of :func:`mmskip.eval.perplexity` (the model's own LM loss).
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["VOCAB", "SEQ", "EOS", "train_tokenizer", "make_model", "perplexity"]

VOCAB = 4096
SEQ = 256
EOS = "<|endoftext|>"


def train_tokenizer(texts: list[str]) -> Any:
    """Byte-level BPE trained with ``tokenizers``, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                   pad_token=EOS, model_max_length=SEQ * 4)


def make_model(vocab_size: int, layers: int = 16, d: int = 128) -> Any:
    """An untrained ``LlamaForCausalLM``: ``layers`` layers of width ``d``, ``d // 32`` heads, SwiGLU
    ``4 d``, tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=d, intermediate_size=4 * d, num_hidden_layers=layers,
                      num_attention_heads=d // 32, num_key_value_heads=d // 32, max_position_embeddings=SEQ * 4,
                      rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg)


@torch.no_grad()
def perplexity(model: Any, stream: torch.Tensor, seq: int = SEQ, max_windows: int = 200) -> float:
    """Perplexity over non-overlapping ``seq``-token windows of a token stream."""
    model.eval()
    n = min(max_windows, (len(stream) - 1) // seq)
    tot, cnt = 0.0, 0
    for i in range(0, n, 8):
        xs = torch.stack([stream[j * seq:(j + 1) * seq] for j in range(i, min(n, i + 8))])
        loss = model(input_ids=xs, labels=xs).loss
        tot += loss.item() * xs.numel()
        cnt += xs.numel()
    return math.exp(tot / cnt)
