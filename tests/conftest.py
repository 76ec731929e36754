"""Shared fixtures: tiny random-init decoder LMs (CPU, float32) and a left-padded batch."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)


def tiny_lm(family: str = "llama", layers: int = 8, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=128, pad_token_id=0, eos_token_id=None, bos_token_id=None)
    if family == "llama":
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=256, **common)
        model = LlamaForCausalLM(cfg)
    elif family == "qwen3":
        cfg = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, max_position_embeddings=256, **common)
        model = Qwen3ForCausalLM(cfg)
    elif family == "gpt2":
        cfg = GPT2Config(n_embd=64, n_layer=layers, n_head=4, n_positions=256, **common)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(family)
    model.generation_config.pad_token_id = 0
    return model.eval()


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The suite's models are tiny: one thread is fastest and does not oversubscribe CI's cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def llama() -> torch.nn.Module:
    return tiny_lm("llama")


@pytest.fixture
def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of lengths 10, 7 and 4, left-padded to 10."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    ids[mask == 0] = 0
    return ids, mask
