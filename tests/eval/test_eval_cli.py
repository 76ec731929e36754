"""``python -m mmskip.eval images|lm`` on zoo names and on local folders, with and without a config."""

from __future__ import annotations

import json

import pytest
import torch

import mmskip
from mmskip import zoo
from mmskip.eval import conditional_accuracy, fid, psnr, ssim
from mmskip.eval.__main__ import LEGEND, format_table, load_config, main
from mmskip.eval.images import generate, labels_for, reference_images
from mmskip.eval.language import agreement, greedy_generate
from mmskip.eval.lm import evaluate_lm, heldout_ids, load_lm
from mmskip.zoo.lm_model import perplexity as card_perplexity


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmskip.zoo.lm_model import train_tokenizer

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
                 "--n-prompts", "3", "--prompt-len", "16", "--max-new-tokens", "6", "--repeats", "3"]
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
    # the speedup is paired: median of 3 interleaved pairs, its quartiles and the FLOPs bound beside it
    t = res["timing"]
    assert t["pairs"] == 3 and t["timed_prompts"] == 3 and acc["speedup"] == t["speedup"]
    assert t["spread"][0] <= acc["speedup"] <= t["spread"][1]
    assert acc["flops_bound"] == t["flops_bound"] == pytest.approx(1 / res["stats"]["flops_fraction"])
    assert f"speedup {acc['speedup']:.2f}x (quartiles {t['spread'][0]:.2f}-{t['spread'][1]:.2f}, 3 interleaved " \
           f"pairs of 3 prompts x 6 new tokens after 1 warm-up); FLOPs bound {t['flops_bound']:.2f}x" in printed
    # token_agreement and decode_agreement side by side, explained
    assert LEGEND in printed and "decode-only techniques skip nothing" in LEGEND


def test_lm_perplexity_defaults_are_the_model_card_set(tiny_llama_dir, tmp_path):
    """The eval CLI reported 64 for stdlib-lm where the card says 95: it measured 32 windows, the card 200."""
    import inspect

    from mmskip.zoo import lm_model

    card = inspect.signature(lm_model.perplexity).parameters
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
                "--out", str(out), "--repeats", "3", "--time-images", "2"])
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
                "--config", cfg.to_json(), "--repeats", "3", "--time-images", "2"])
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
                "--max-windows", "1", "--json", "--repeats", "3"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"] == "stdlib-lm" and printed["baseline"]["perplexity"] == res["baseline"]["perplexity"]


def test_load_config_reads_files_folders_and_inline_json(tmp_path):
    """``--config missing.json`` was parsed as inline JSON; a value naming a path is read as a file."""
    cfg = mmskip.VoidLayerConfig()
    cfg.save_pretrained(tmp_path / "saved")
    assert load_config(str(tmp_path / "saved")) == cfg  # a folder written by save_pretrained
    assert load_config(str(tmp_path / "saved" / "mmskip_config.json")) == cfg
    assert load_config("  " + cfg.to_json()) == cfg
    with pytest.raises(FileNotFoundError, match=r"missing\.json: no such file; pass a config JSON file"):
        load_config(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match=r"inline JSON is not valid JSON \(Expecting property name"):
        load_config("{not json")


def test_lm_speed_is_the_paired_median_with_its_spread_and_bound_warning(tiny_llama_dir, monkeypatch, capsys):
    """Two identical runs gave 0.199x and 6.0x: one unpaired perf_counter each. The speedup is now
    ``mmskip.timing.paired``'s median; the FLOPs fraction comes from an untimed call before it."""
    import mmskip.eval.lm as lm
    from mmskip.timing import Timing

    seen = []

    def fake_paired(baseline, candidates, repeats, warmup):
        seen.append((repeats, warmup, sorted(candidates)))
        return {"accelerated": Timing((1.0, 1.0, 1.0, 1.0), (0.5, 0.25, 0.2, 0.1))}  # ratios 2, 4, 5, 10

    monkeypatch.setattr(lm, "paired", fake_paired)
    cfg = mmskip.LayerSkipConfig(schedule=mmskip.schedules.explicit([1]), phase="all")
    res = main(["lm", "--model", str(tiny_llama_dir), "--text-file", str(tiny_llama_dir / "heldout.py"),
                "--n-prompts", "2", "--prompt-len", "16", "--max-new-tokens", "3", "--repeats", "4",
                "--config", cfg.to_json()])
    assert seen == [(4, 1, ["accelerated"])]
    acc, t = res["accelerated"], res["timing"]
    assert acc["speedup"] == 4.5 and t["spread"] == [3.5, 6.25] and t["pairs"] == 4
    assert acc["seconds"] == pytest.approx(0.225) and res["baseline"]["seconds"] == 1.0
    # the stats (and FLOPs fraction) are those of one untimed generation of the prompts, nothing else
    model, tok = load_lm(str(tiny_llama_dir))
    ids = heldout_ids(tok, str(tiny_llama_dir / "heldout.py"))
    stride = max(16, (len(ids) - 16) // 2)
    prompts = [ids[i:i + 16] for i in range(0, len(ids) - 16, stride)][:2]
    with mmskip.applied(model, cfg) as handle:
        greedy_generate(model, prompts, 3)
        expected = handle.stats()
    assert res["stats"] == expected
    bound = 1 / expected["flops_fraction"]  # 4 layers, 1 skipped: well below the faked 3.5x lower quartile
    assert t["flops_bound"] == pytest.approx(bound) and t["bound_warning"].startswith("measured 4.50x")
    printed = capsys.readouterr().out
    assert f"warning: {t['bound_warning']}" in printed


def test_a_config_that_does_not_fit_the_model_is_one_line(tiny_llama_dir, capsys):
    from mmskip import cli

    diffusion = pytest.importorskip("mmskip.diffusion")
    cfg = diffusion.FeatureInheritanceConfig(schedule=mmskip.schedules.interval(2))
    assert cli.main(["eval", "lm", "--model", str(tiny_llama_dir), "--config", cfg.to_json()]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"mmskip eval lm: error: --config feature_inheritance does not fit --model "
                              f"{tiny_llama_dir}: ") and "Traceback" not in "".join(err)


@pytest.mark.skipif("digits-dit" not in zoo.available(), reason="zoo model digits-dit not trained")
def test_images_flops_measurement_is_not_timed(monkeypatch):
    """``eval images`` counted feature inheritance's one FLOPs-measuring call into the first accelerated
    timing (0.33x; 0.98x without it). The config is applied once, to a copy of the denoiser, and its
    first, untimed call measures; the paired rounds only generate."""
    diffusion = pytest.importorskip("mmskip.diffusion")
    import mmskip.diffusion.inheritance.hooks as hooks

    import mmskip.eval.images as images

    phase, measured = ["untimed"], []

    class Counting(hooks.FlopCounterMode):
        def __enter__(self):
            measured.append(phase[0])
            return super().__enter__()

    real_paired = images.paired

    def timed_paired(*args, **kwargs):
        phase[0] = "timed"
        return real_paired(*args, **kwargs)

    monkeypatch.setattr(hooks, "FlopCounterMode", Counting)
    monkeypatch.setattr(images, "paired", timed_paired)
    cfg = diffusion.FeatureInheritanceConfig(schedule=mmskip.schedules.interval(2))
    res = main(["images", "--pipeline", "digits-dit", "--steps", "4", "--n", "4", "--time-images", "2", "--clip",
                "none", "--repeats", "3", "--config", cfg.to_json()])
    assert measured == ["untimed"] and phase == ["timed"]
    assert res["timing"]["pairs"] == 3 and res["timing"]["timed_images"] == 2
    assert res["accelerated"]["flops_bound"] == pytest.approx(1 / res["stats"]["flops_fraction"])
    assert res["stats"]["flops_fraction"] < 1
