"""``python -m mmskip.eval images|lm`` on zoo names and on local folders, with and without a config."""

from __future__ import annotations

import json

import pytest
import torch

import mmskip
from mmskip import zoo
from mmskip.eval import conditional_accuracy, fid, psnr, ssim
from mmskip.eval.__main__ import format_table, load_config, main
from mmskip.eval.images import generate, labels_for, reference_images
from mmskip.eval.language import agreement, greedy_generate
from mmskip.eval.lm import evaluate_lm, heldout_ids, load_lm
from mmskip.zoo.train_lm import perplexity as card_perplexity


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmskip.zoo.train_lm import train_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = train_tokenizer(["def f(x):\n    return x + 1\n" * 20, "import os\nprint(os.getcwd())\n" * 20])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    text = folder / "heldout.py"
    text.write_text("import os\n\n\ndef main(argv):\n    return os.path.join(*argv)\n" * 40)
    return folder


def test_load_config_round_trips_a_registered_technique(tmp_path):
    cfg = mmskip.LayerSkipConfig(schedule=mmskip.schedules.explicit([1]))
    path = tmp_path / "cfg.json"
    path.write_text(cfg.to_json())
    assert load_config(str(path)) == cfg
    assert load_config(cfg.to_json()) == cfg
    assert load_config(None) is None


def test_lm_cli_on_a_local_folder_with_and_without_config(tiny_llama_dir, tmp_path, capsys):
    cfg = mmskip.LayerSkipConfig(schedule=mmskip.schedules.explicit([1, 2]), phase="all")
    out = tmp_path / "lm.json"
    base_args = ["lm", "--model", str(tiny_llama_dir), "--text-file", str(tiny_llama_dir / "heldout.py"),
                 "--n-prompts", "3", "--prompt-len", "16", "--max-new-tokens", "6"]
    res = main(base_args + ["--out", str(out)])
    assert "accelerated" not in res
    model, tok = load_lm(str(tiny_llama_dir))
    ids = heldout_ids(tok, str(tiny_llama_dir / "heldout.py"))
    # independent perplexity: the zoo recipe's (model-card) implementation, on its default windows
    assert res["baseline"]["perplexity"] == pytest.approx(card_perplexity(model, ids), rel=1e-5)
    res = main(base_args + ["--config", cfg.to_json(), "--out", str(out)])
    acc = res["accelerated"]
    # independent skipping: forward hooks that hand layers 1 and 2's input straight through
    stride = max(16, (len(ids) - 16) // 3)
    prompts = [ids[i:i + 16] for i in range(0, len(ids) - 16, stride)][:3]
    base = greedy_generate(model, prompts, 6)
    hooks = [model.model.layers[i].register_forward_hook(lambda m, args, kw, out: args[0] if args else
                                                         kw["hidden_states"], with_kwargs=True) for i in (1, 2)]
    try:
        expected = agreement(model, prompts, base)
    finally:
        for h in hooks:
            h.remove()
    assert {k: acc[k] for k in expected} == pytest.approx(expected)
    # skipping every token's layers (phase="all"): the cached decode and the plain forward agree
    assert acc["decode_agreement"] == pytest.approx(acc["token_agreement"])
    assert json.loads(out.read_text())["config"]["technique"] == "layer_skip"
    printed = capsys.readouterr().out
    assert "| accelerated |" in printed and f"perplexity on the {res['perplexity_set']}" in printed


def test_lm_perplexity_defaults_are_the_model_card_set(tiny_llama_dir, tmp_path):
    """The eval CLI reported 64 for stdlib-lm where the card says 95: it measured 32 windows, the card 200."""
    import inspect

    from mmskip.zoo import train_lm

    card = inspect.signature(train_lm.perplexity).parameters
    ev = inspect.signature(evaluate_lm).parameters
    assert (ev["seq_len"].default, ev["max_windows"].default) == (card["seq"].default, card["max_windows"].default)
    text = tmp_path / "long.py"
    text.write_text("".join(f"x{i} = os.path.join({i * 7919 % 1009}, {i % 97})\n" for i in range(4000)))
    model, tok = load_lm(str(tiny_llama_dir))
    ids = heldout_ids(tok, str(text))
    assert len(ids) > 40 * 256  # more than the 32 windows the CLI used to measure
    res = evaluate_lm(model, tok, n_prompts=1, prompt_len=8, max_new_tokens=1, text_file=str(text))
    assert res["baseline"]["perplexity"] == pytest.approx(card_perplexity(model, ids), rel=1e-6)
    n = min(200, (len(ids) - 1) // 256)
    assert res["perplexity_set"].startswith(f"first {n} windows x 256 tokens = {n * 256} of the {len(ids)} tokens")


@pytest.mark.skipif("digits-dit" not in zoo.available(), reason="zoo model digits-dit not trained")
def test_images_cli_baseline_on_zoo_dit(tmp_path):
    out = tmp_path / "images.json"
    res = main(["images", "--pipeline", "digits-dit", "--steps", "4", "--n", "10", "--clip", "none",
                "--out", str(out)])
    row = res["baseline"]
    labels = labels_for(10)  # the same samples generated outside the CLI, measured directly
    imgs = generate(zoo.load("digits-dit"), labels, steps=4, guidance_scale=4.0, seed=0)
    assert row["accuracy"] == conditional_accuracy(imgs, labels) and row["accuracy"] > 0.3
    assert row["fid"] == pytest.approx(fid(reference_images("test"), imgs), rel=1e-4)
    assert json.loads(out.read_text())["pipeline"] == "digits-dit"
    assert "| baseline |" in format_table(res)


@pytest.mark.skipif("digits-dit" not in zoo.available(), reason="zoo model digits-dit not trained")
def test_images_cli_with_a_diffusion_config_on_a_local_folder():
    diffusion = pytest.importorskip("mmskip.diffusion")
    from mmskip import schedules

    cfg = diffusion.FeatureInheritanceConfig(schedule=schedules.interval(2))
    res = main(["images", "--pipeline", str(zoo.path("digits-dit")), "--steps", "6", "--n", "10", "--clip", "none",
                "--config", cfg.to_json()])
    acc = res["accelerated"]
    pipe, labels = zoo.load("digits-dit"), labels_for(10)
    base = generate(pipe, labels, steps=6, guidance_scale=4.0, seed=0)
    with mmskip.applied(pipe.transformer, cfg):
        imgs = generate(pipe, labels, steps=6, guidance_scale=4.0, seed=0)
    assert acc["psnr_vs_baseline"] == pytest.approx(psnr(imgs, base), rel=1e-4)
    assert acc["ssim_vs_baseline"] == pytest.approx(ssim(imgs, base), rel=1e-4) and acc["ssim_vs_baseline"] < 1
    assert res["stats"]["technique"] == "feature_inheritance"


def test_json_flag_prints_the_result_as_json(capsys):
    import json

    res = main(["lm", "--model", "stdlib-lm", "--n-prompts", "1", "--prompt-len", "16", "--max-new-tokens", "2",
                "--max-windows", "1", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"] == "stdlib-lm" and printed["baseline"]["perplexity"] == res["baseline"]["perplexity"]
