"""Fixtures: a tiny random LLaVA and a left-padded batch of three prompts (see _tiny.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from ._tiny import padded_prompts, tiny_llava


@pytest.fixture(scope="module")
def llava() -> LlavaForConditionalGeneration:
    return tiny_llava()


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    return padded_prompts()
