"""mmskip.eval metrics agree with known cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmskip import zoo
from mmskip.eval import clip_score, conditional_accuracy, fid, perplexity, psnr, ssim
from mmskip.eval.language import agreement, greedy_generate
from mmskip.zoo.data import caption, load_split, to_unit

needs = lambda name: pytest.mark.skipif(name not in zoo.available(), reason=f"zoo model {name} not trained")  # noqa: E731


def _frechet(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID computed without torchmetrics: the classifier's features, then scipy's matrix square root."""
    from scipy import linalg

    from mmskip.eval import ClassifierFeatures

    feats = ClassifierFeatures()
    a, b = feats(real).numpy(), feats(fake).numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_split("test")
    return to_unit(x), y


def test_psnr_ssim_known_cases(digits):
    x, _ = digits
    assert psnr(x, x) >= 99.0
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-4)
    noisy = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    mse = ((noisy - x) ** 2).mean(dim=(1, 2, 3))  # independent per-image PSNR, then the mean
    assert psnr(noisy, x) == pytest.approx(float((10 * torch.log10(1 / mse)).mean()), rel=1e-5)
    assert psnr(noisy, x) == pytest.approx(21.237, abs=1e-2)
    assert ssim(noisy, x) == pytest.approx(0.6132, abs=1e-3)  # reference value (torchmetrics, 11x11 Gaussian)
    assert ssim(x, 1 - x) < 0  # inverted contrast: negative structure correlation


@needs("digits-classifier")
def test_fid_self_is_zero_and_noise_is_far(digits):
    x = digits[0][:150]
    assert abs(fid(x, x)) < 1e-3
    train = to_unit(load_split("train")[0][:150])
    noise = torch.rand(150, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert fid(x, train) < fid(x, noise) / 10
    assert fid(x, train) == pytest.approx(_frechet(x, train), rel=1e-3)


@needs("digits-classifier")
def test_conditional_accuracy_on_real_digits(digits):
    x, y = digits
    direct = float((zoo.load("digits-classifier").predict(x * 2 - 1) == y).float().mean())
    assert conditional_accuracy(x, y) == direct and direct >= 0.95
    assert conditional_accuracy(x, (y + 1) % 10) <= 0.05


@needs("digits-clip")
def test_clip_score_higher_for_matching_captions(digits):
    x, y = digits
    right = clip_score(x, [caption(int(c)) for c in y])
    wrong = clip_score(x, [caption(int(c + 1) % 10) for c in y])
    assert right == pytest.approx(79.41, abs=0.05) and wrong == pytest.approx(8.63, abs=0.05)  # reference values


def test_lm_metrics_on_a_tiny_random_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (300,), generator=torch.Generator().manual_seed(0))
    ppl = perplexity(model, ids, seq_len=64)
    windows = ids[: 4 * 64].view(4, 64)  # (300 - 1) // 64 = 4 windows; independent: the model's own LM loss
    with torch.no_grad():
        assert ppl == pytest.approx(math.exp(float(model(input_ids=windows, labels=windows).loss)), rel=1e-5)
    prompts = [ids[i:i + 8] for i in range(0, 40, 8)]
    base = greedy_generate(model, prompts, max_new_tokens=6)
    same = agreement(model, prompts, base, base)
    assert same == {"token_agreement": 1.0, "exact_match": 1.0, "prefix_match": 1.0}
    other = agreement(model, prompts, base, [(b + 1) % 64 for b in base])
    assert other["exact_match"] == 0.0 and other["prefix_match"] == 0.0
