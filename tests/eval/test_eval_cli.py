"""``python -m mmskip.eval images|lm`` on zoo names and on local folders, with and without a config."""

from __future__ import annotations

import json

import pytest
import torch

from mmskip import zoo
from mmskip.eval.__main__ import format_table, load_config, main


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
    import mmskip

    cfg = mmskip.LayerSkipConfig(schedule=mmskip.schedules.explicit([1]))
    path = tmp_path / "cfg.json"
    path.write_text(cfg.to_json())
    assert load_config(str(path)) == cfg
    assert load_config(cfg.to_json()) == cfg
    assert load_config(None) is None


def test_lm_cli_on_a_local_folder_with_and_without_config(tiny_llama_dir, tmp_path, capsys):
    import mmskip

    cfg = mmskip.LayerSkipConfig(schedule=mmskip.schedules.explicit([1, 2]), phase="all")
    out = tmp_path / "lm.json"
    base_args = ["lm", "--model", str(tiny_llama_dir), "--text-file", str(tiny_llama_dir / "heldout.py"),
                 "--n-prompts", "3", "--prompt-len", "16", "--max-new-tokens", "6"]
    res = main(base_args + ["--out", str(out)])
    assert res["baseline"]["perplexity"] > 1 and "accelerated" not in res
    res = main(base_args + ["--config", cfg.to_json(), "--out", str(out)])
    acc = res["accelerated"]
    assert 0.0 <= acc["token_agreement"] <= 1.0 and 0.0 <= acc["exact_match"] <= 1.0
    # skipping every token's layers (phase="all"): the cached decode and the plain forward agree
    assert acc["decode_agreement"] == pytest.approx(acc["token_agreement"])
    assert json.loads(out.read_text())["config"]["technique"] == "layer_skip"
    assert "| accelerated |" in capsys.readouterr().out


@pytest.mark.skipif("digits-dit" not in zoo.available(), reason="zoo model digits-dit not trained")
def test_images_cli_baseline_on_zoo_dit(tmp_path):
    out = tmp_path / "images.json"
    res = main(["images", "--pipeline", "digits-dit", "--steps", "4", "--n", "10", "--clip", "none",
                "--out", str(out)])
    row = res["baseline"]
    assert row["accuracy"] > 0.3 and row["fid"] > 0 and row["seconds"] > 0
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
    assert acc["psnr_vs_baseline"] > 5 and 0 < acc["ssim_vs_baseline"] <= 1
    assert res["stats"]["technique"] == "feature_inheritance"
