import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mmskip import cli

from .conftest import tiny_lm

APPS_DEMO = Path(__file__).resolve().parents[1] / "apps" / "demo.py"


@pytest.fixture(scope="module")
def demo():
    """``apps/demo.py`` (what ``bash run.sh demo`` runs), imported from its path: apps/ is no package."""
    spec = importlib.util.spec_from_file_location("apps_demo", APPS_DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("demo", "app", "bench", "eval", "analyze", "train", "zoo"):
        assert f"\n  {name} " in out


@pytest.mark.parametrize("command, expect", [
    (["demo", "--help"], "--only"), (["app", "--help"], "--share"), (["eval", "--help"], "images"), (["train", "--help"], "early-exit"),
    (["zoo", "--help"], "--overwrite-shipped"), (["bench", "skip_aware", "--help"], "--smoke"),
])
def test_every_subcommand_has_help(command, expect, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(command)
    assert e.value.code == 0 and expect in capsys.readouterr().out


def test_bench_lists_and_refuses_unknown_scripts(capsys):
    assert cli.main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    assert "\n  skip_aware " in out and "Does skip-aware training pay?" in out
    assert cli.main(["bench", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmskip bench: error: unknown benchmark 'nope'; choose one of: ") and err.count("\n") == 1


def test_bench_list_describes_scripts_from_their_docstrings_without_importing_them(monkeypatch, tmp_path, capsys):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "alpha.py").write_text('"""Alpha does a thing\nover two lines. More words.\n\nDetails."""\n'
                                    'raise SystemExit("imported")\n\n\ndef main(argv):\n    pass\n')
    (bench / "shared_rows.py").write_text('"""A module the scripts share: no main."""\n')
    (bench / "bare.py").write_text("def main(argv):\n    pass\n")
    monkeypatch.setattr(cli, "_REPO", tmp_path)
    assert cli.main(["bench", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2:] == ["  alpha  Alpha does a thing over two lines", "  bare   (no docstring)"]
    assert cli.main(["bench", "shared_rows"]) == 2  # not a runnable benchmark


def test_help_and_bench_list_import_no_torch():
    """``mmskip --help`` took 5-8 s: importing the CLI pulled torch, transformers and diffusers."""
    probe = ("import sys, contextlib, io\n"
             "import mmskip.cli\n"
             "with contextlib.redirect_stdout(io.StringIO()):\n"
             "    mmskip.cli.main(['--help']); mmskip.cli.main(['bench', '--list'])\n"
             "print(sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_python_m_aliases_report_errors_like_the_mmskip_command():
    out = subprocess.run([sys.executable, "-m", "mmskip.cli", "bench", "nope"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and out.stderr.startswith("mmskip bench: error: unknown benchmark 'nope'")


def test_scripts_outside_a_clone_are_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "_REPO", tmp_path)
    assert cli.main(["demo"]) == 2
    assert "ships with the mmskip repository" in capsys.readouterr().err


def test_unknown_command_fails(capsys):
    assert cli.main(["bogus"]) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    assert cap.err.startswith("usage: mmskip COMMAND")
    last = cap.err.strip().splitlines()[-1]
    assert last.startswith("mmskip: error: unknown command 'bogus'") and "analyze" in last


def test_no_command_prints_usage_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage: mmskip COMMAND" in capsys.readouterr().err


def _one_error_line(capsys) -> str:
    cap = capsys.readouterr()
    lines = [ln for ln in cap.err.strip().splitlines() if "Loading weights" not in ln]  # transformers' progress bar
    assert cap.out == "" and len(lines) == 1 and "Traceback" not in cap.err, cap.err
    assert lines[0].startswith("mmskip analyze: error: ")
    return lines[0]


def test_analyze_missing_text_file_is_one_clear_line(tmp_path, capsys):
    missing = tmp_path / "missing.py"
    assert cli.main(["analyze", "--model", "stdlib-lm", "--text", str(missing)]) == 2
    line = _one_error_line(capsys)
    assert f"--text {missing}: no such file" in line and "pass a text file" in line


def test_analyze_unknown_model_is_one_clear_line(tmp_path, capsys):
    text = tmp_path / "t.py"
    text.write_text("def f(x):\n    return x\n" * 50)
    assert cli.main(["analyze", "--model", "nope", "--text", str(text)]) == 2
    line = _one_error_line(capsys)
    assert "--model nope: 'nope' is neither a zoo name (" in line and "stdlib-lm" in line
    assert "from_pretrained folder" in line


def test_analyze_text_shorter_than_a_chunk_is_one_clear_line(tiny_lm_folder, tmp_path, capsys):
    text = tmp_path / "short.py"
    text.write_text("x = 1\n")
    assert cli.main(["analyze", "--model", str(tiny_lm_folder), "--text", str(text)]) == 2
    assert "smaller --chunk-tokens" in _one_error_line(capsys)


@pytest.fixture
def tiny_lm_folder(tmp_path):
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=128, special_tokens=["<pad>", "<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def f(x):\n    return x + 1\n", "class A:\n    pass\n"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    model = tiny_lm("llama", layers=8)
    model.resize_token_embeddings(len(fast))
    model.save_pretrained(tmp_path)
    fast.save_pretrained(tmp_path)
    return tmp_path


def test_language_demo_runs_every_technique(demo, tiny_lm_folder, capsys):
    rows = demo.language_demo(str(tiny_lm_folder), new_tokens=6)
    assert [r["config"] for r in rows][0] == "full model"
    assert len(rows) == 5
    assert rows[0]["agreement"] == 1.0 and rows[0]["flops_bound"] == 1.0
    assert rows[2]["skipped_layers"] == [1, 3, 5, 6] and rows[2]["flops_bound"] > 1.0
    assert "Unified" in capsys.readouterr().out


def test_demo_quick_language_only_option(demo, tiny_lm_folder, monkeypatch, capsys):
    seen, spec = [], []
    monkeypatch.setattr(demo, "language_demo", lambda **kw: seen.append(kw) or [])
    monkeypatch.setattr(demo, "speculative_demo", lambda name, **kw: spec.append((name, kw)) or [])
    monkeypatch.setattr(demo, "diffusion_demo", lambda *a, **kw: pytest.fail("--only language ran diffusion"))
    assert demo.main(["--only", "language", "--new-tokens", "4", "--repeats", "3"]) == 0
    names = [n for n in ("stdlib-lm", "stdlib-lm-skip") if n in demo.zoo.available()]
    assert seen == [{"model_name": n, "new_tokens": 4, "repeats": 3} for n in names]
    assert spec == [(n, {"new_tokens": 4, "repeats": 3}) for n in names]


def test_speculative_demo_is_lossless(demo, tiny_lm_folder, capsys):
    rows = demo.speculative_demo(str(tiny_lm_folder), new_tokens=6, repeats=3)
    assert [r["config"] for r in rows] == ["SWIFT (layer set searched on the fly)", "SWIFT + prompt lookup",
                                           "early exit at layer 4", "transformers prompt lookup (peer)"]
    assert all(r["identical"] == "4/4" and r["speedup"] > 0 for r in rows)
    assert "Lossless speculative decoding" in capsys.readouterr().out


def test_vision_demo_runs_every_multimodal_technique(demo, capsys):
    rows = demo.vision_demo(n=3)
    assert [(r["model"], r["config"]) for r in rows][::2] == [
        ("digits-llava", "unmodified"), ("digits-video", "unmodified"), ("digits-video", "streamed, unmodified"),
        ("digits-florence", "unmodified")]
    for plain, skipped in zip(rows[::2], rows[1::2], strict=True):
        assert plain["work"] == 1.0 and 0.0 < skipped["work"] < 1.0  # every technique skips some work
    assert rows[5]["kv_bytes_per_frame"] < rows[4]["kv_bytes_per_frame"]
    assert "== Vision" in capsys.readouterr().out


def test_demo_quick_vision_only_option(demo, monkeypatch):
    seen = []
    monkeypatch.setattr(demo, "vision_demo", lambda: seen.append(1) or [])
    monkeypatch.setattr(demo, "language_demo", lambda **kw: pytest.fail("--only vision ran language"))
    monkeypatch.setattr(demo, "diffusion_demo", lambda *a, **kw: pytest.fail("--only vision ran diffusion"))
    assert demo.main(["--only", "vision"]) == 0 and seen == [1]


def test_mmskip_demo_module_is_gone():
    """One demo, in apps/: the library no longer ships a ``mmskip.demo`` beside it."""
    assert importlib.util.find_spec("mmskip.demo") is None


def test_demo_summary_names_the_tuned_best_speedup_per_quality_level(demo):
    """The summary comes from tuned fronts (mmskip.tune), one line per model and floor."""
    tuned_summary = demo._demo_tune().tuned_summary
    rows = [{"model": "m", "metric": "agreement", "floor": 0.95, "best": "layer_skip speedup=1.5", "faster": True,
             "speedup": 1.5, "spread": [1.4, 1.6], "quality": 0.97, "trials": 12},
            {"model": "m", "metric": "agreement", "floor": 1.0, "best": "baseline", "faster": False, "speedup": 1.0,
             "spread": [1.0, 1.0], "quality": 1.0, "trials": 12},
            {"model": "p", "metric": "psnr", "floor": 35.0, "best": "unipc-8", "faster": True, "speedup": 2.5,
             "spread": [2.4, 2.6], "quality": 35.7, "trials": 40}]
    lines = tuned_summary(rows)
    assert lines[0].startswith("m, agreement >= 0.95") and "1.50x (1.40-1.60)  layer_skip speedup=1.5" in lines[0]
    assert "nothing faster than the baseline" in lines[1]
    assert lines[2].startswith("p, psnr >= 35") and "2.50x" in lines[2] and "unipc-8" in lines[2]


def test_demo_tuning_restarts_a_log_of_other_weights(demo, tmp_path, monkeypatch):
    """The demo's own trial log, written before a zoo model was retrained, is refused by mmskip.tune
    (other weights); the demo deletes it and searches afresh instead of failing or reusing it."""
    from types import SimpleNamespace

    from mmskip.tuning.trial_log import TrialLogMismatch

    mod = demo._demo_tune()
    stale = tmp_path / "tune" / "stdlib-lm"
    stale.mkdir(parents=True)
    (stale / "trials.jsonl").write_text("{}\n")
    calls = []

    def fake_tune(target, calib, held, floor, budget, folder, repeats):
        calls.append(folder.exists())
        if folder.exists():
            raise TrialLogMismatch("logs another tuning run")
        best = SimpleNamespace(candidate=SimpleNamespace(label="baseline", family="baseline"), speedup=1.0,
                               spread=(1.0, 1.0), quality={"agreement": 1.0}, flops_bound=1.0, forward_bound=None)
        return SimpleNamespace(best_measured=best, metric="agreement", message="ok", trials=1)

    monkeypatch.setattr(mod, "_tune", fake_tune)
    monkeypatch.setattr(mod.zoo, "load", lambda name: (SimpleNamespace(float=lambda: SimpleNamespace(eval=lambda: 0)),
                                                       None))
    monkeypatch.setattr(mod, "make_target", lambda model, **kw: None)
    monkeypatch.setattr(mod, "stock_inputs", lambda *a, **kw: [])
    monkeypatch.setitem(mod.FLOORS, "stdlib-lm", (0.8,))
    rows = mod.tune_demo(["stdlib-lm"], "2", 3, tmp_path)
    assert calls == [True, False] and not stale.exists() and rows[0]["best"] == "baseline"


def test_analyze_json_prints_the_report(tiny_lm_folder, tmp_path, capsys):
    import json

    text = tmp_path / "t.py"
    text.write_text("def f(x):\n    return x + 1\n" * 200)
    assert cli.main(["analyze", "--model", str(tiny_lm_folder), "--text", str(text), "--out", str(tmp_path / "a"),
                     "--chunks", "2", "--chunk-tokens", "16", "--no-plots", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_layers"] >= 1 and "suggested_skip" in report


def test_demo_json_writes_every_section(demo, monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "language_demo", lambda **kw: [{"config": "full model", "speedup": 1.0,
                                                               "agreement": 1.0, "sample": "x"}])
    monkeypatch.setattr(demo, "speculative_demo", lambda name, **kw: [])
    tuned = [{"model": "stdlib-lm", "metric": "agreement", "floor": 0.8, "best": "baseline", "faster": False,
              "speedup": 1.0, "spread": [1.0, 1.0], "quality": 1.0, "trials": 1}]
    monkeypatch.setattr(demo, "tune_demo", lambda *a, **kw: tuned)
    out = tmp_path / "demo.json"
    assert demo.main(["--only", "language", "--json", str(out)]) == 0
    import json

    data = json.loads(out.read_text())
    assert set(data) == {"language", "speculative", "diffusion", "vision", "tuned"} and "sample" not in data["language"][0]
    assert data["tuned"] == tuned
