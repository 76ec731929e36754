"""mmskip.eval metrics agree with known cases."""

from __future__ import annotations

import pytest
import torch

from mmskip import zoo
from mmskip.eval import clip_score, conditional_accuracy, fid, perplexity, psnr, ssim
from mmskip.eval.language import agreement, greedy_generate
from mmskip.zoo.data import caption, load_split, to_unit

needs = lambda name: pytest.mark.skipif(name not in zoo.available(), reason=f"zoo model {name} not trained")  # noqa: E731


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_split("test")
    return to_unit(x), y


def test_psnr_ssim_known_cases(digits):
    x, _ = digits
    assert psnr(x, x) >= 99.0
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-4)
    noisy = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert 15 < psnr(noisy, x) < 25
    assert ssim(noisy, x) < 0.95


@needs("digits-classifier")
def test_fid_self_is_zero_and_noise_is_far(digits):
    x = digits[0][:150]
    assert abs(fid(x, x)) < 1e-3
    train = to_unit(load_split("train")[0][:150])
    noise = torch.rand(150, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert fid(x, train) < fid(x, noise) / 10


@needs("digits-classifier")
def test_conditional_accuracy_on_real_digits(digits):
    x, y = digits
    assert conditional_accuracy(x, y) >= 0.95
    assert conditional_accuracy(x, (y + 1) % 10) <= 0.05


@needs("digits-clip")
def test_clip_score_higher_for_matching_captions(digits):
    x, y = digits
    right = clip_score(x, [caption(int(c)) for c in y])
    wrong = clip_score(x, [caption(int(c + 1) % 10) for c in y])
    assert right > wrong + 5


def test_lm_metrics_on_a_tiny_random_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (300,), generator=torch.Generator().manual_seed(0))
    ppl = perplexity(model, ids, seq_len=64)
    assert 20 < ppl < 200  # a random model is near-uniform over 64 tokens
    prompts = [ids[i:i + 8] for i in range(0, 40, 8)]
    base = greedy_generate(model, prompts, max_new_tokens=6)
    same = agreement(model, prompts, base, base)
    assert same == {"token_agreement": 1.0, "exact_match": 1.0, "prefix_match": 1.0}
    other = agreement(model, prompts, base, [(b + 1) % 64 for b in base])
    assert other["exact_match"] == 0.0 and other["prefix_match"] == 0.0
