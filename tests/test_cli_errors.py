"""Every user error of the ``mmskip`` command line is one line, ``mmskip CMD: error: ...``, and exit status 2.

These used to end in a traceback (a missing model, a bad ``--config``, ``--chunk-tokens 0``), to run and
report metrics (``--steps -1``), or to fail after the whole run (an unwritable ``--out``). Nothing here
loads a model or trains: each error is found before any work.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from mmskip import cli


def _exit_code(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse's errors exit from inside the subcommand
        return e.code


def one_error_line(capsys, argv: list[str], prog: str) -> str:
    """Run ``mmskip ARGV``; assert status 2, nothing on stdout and one error line; return that line."""
    code = _exit_code(argv)
    cap = capsys.readouterr()
    lines = [ln for ln in cap.err.strip().splitlines() if "Loading weights" not in ln]  # transformers' progress bar
    assert code == 2 and cap.out == "" and len(lines) == 1 and "Traceback" not in cap.err, cap.err
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0]


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a model, a pipeline or a recipe is loaded: the errors must come first."""
    import mmskip.eval.images
    import mmskip.eval.lm
    from mmskip import zoo

    def refuse(*args, **kwargs):
        pytest.fail("work started before the error was found")

    for module, name in ((zoo, "load"), (mmskip.eval.lm, "evaluate_lm"), (mmskip.eval.images, "evaluate_pipeline")):
        monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize("argv, says", [
    (["eval", "lm", "--model", "/nonexistent"], "--model /nonexistent: '/nonexistent' is neither a zoo name ("),
    (["eval", "lm", "--model", "unknown-name"], "--model unknown-name: 'unknown-name' is neither a zoo name ("),
    (["eval", "lm", "--config", "{not json"], "--config inline JSON is not valid JSON (Expecting property name"),
    (["eval", "lm", "--config", "missing.json"], "--config missing.json: no such file; pass a config JSON file"),
    (["eval", "lm", "--config", "[1, 2]"], "--config [1, 2]: no such file;"),
    (["eval", "images", "--pipeline", "/nonexistent"], "--pipeline /nonexistent: '/nonexistent' is neither a zoo"),
    (["eval", "images", "--pipeline", ""], "no pipeline given; pass a zoo name"),
    (["analyze", "--model", "unknown-name", "--text", __file__], "--model unknown-name: 'unknown-name' is neither"),
])
def test_missing_or_malformed_inputs_are_one_line(argv, says, capsys, no_work):
    prog = "mmskip " + " ".join(argv[:2] if argv[0] == "eval" else argv[:1])
    assert says in one_error_line(capsys, argv, prog)


def test_a_config_folder_or_file_that_is_no_config_is_one_line(tmp_path, capsys, no_work):
    (tmp_path / "cfg.json").write_text('{"technique": "layer_skip", "speed": 2}')
    line = one_error_line(capsys, ["eval", "lm", "--config", str(tmp_path / "cfg.json")], "mmskip eval lm")
    assert "no field(s) ['speed']" in line
    (tmp_path / "bad.json").write_text("{")
    line = one_error_line(capsys, ["eval", "lm", "--config", str(tmp_path / "bad.json")], "mmskip eval lm")
    assert f"--config {tmp_path / 'bad.json'} is not valid JSON" in line


def test_unknown_technique_lists_every_registered_technique():
    """It listed only the language techniques: the vision and diffusion configs register on import.
    A fresh interpreter, so that no other test has imported them already."""
    probe = ("from mmskip import cli\n"
             "cli.main(['eval', 'lm', '--model', 'unknown-name', '--config', '{\"technique\": \"nope\"}'])\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("mmskip eval lm: error: --config unknown technique 'nope'; known: ["), out.stderr
    for technique in ("layer_skip", "self_speculative", "pmod", "mue", "feature_inheritance", "step_skip"):
        assert f"'{technique}'" in line


@pytest.mark.parametrize("argv, says", [
    (["eval", "images", "--steps", "-1"], "argument --steps: -1 is not a whole number >= 1"),
    (["eval", "images", "--n", "0"], "argument --n: 0 is not a whole number >= 1"),
    (["eval", "images", "--time-images", "0"], "argument --time-images: 0 is not"),
    (["eval", "images", "--guidance-scale", "nan"], "argument --guidance-scale: nan is not a number >= 0"),
    (["eval", "lm", "--n-prompts", "0"], "argument --n-prompts: 0 is not a whole number >= 1"),
    (["eval", "lm", "--max-new-tokens", "-2"], "argument --max-new-tokens: -2 is not"),
    (["eval", "lm", "--repeats", "2"], "argument --repeats: 2 is not a whole number >= 3"),
    (["eval", "lm", "--seq-len", "1"], "argument --seq-len: 1 is not a whole number >= 2"),
    (["eval", "lm", "--text-file", "/nonexistent.txt"], "argument --text-file: /nonexistent.txt: no such file"),
    (["analyze", "--model", "m", "--text", "t", "--chunk-tokens", "0"], "argument --chunk-tokens: 0 is not"),
    (["analyze", "--model", "m", "--text", "t", "--chunks", "-1"], "argument --chunks: -1 is not"),
    (["analyze", "--model", "m", "--text", "t", "--min-agreement", "1.5"], "argument --min-agreement: 1.5 is not"),
    (["analyze", "--model", "m", "--text", "t", "--max-skip", "1"], "argument --max-skip: 1 is not a number >= 0"),
    (["analyze", "--model", "m", "--text", "t", "--void-alpha", "0"], "argument --void-alpha: 0 is not"),
    (["train", "--out", "x", "--steps", "0"], "argument --steps: 0 is not a whole number >= 1"),
    (["train", "--out", "x", "--p-max", "2"], "argument --p-max: 2 is not a number from 0 to 1"),
    (["train", "--out", "x", "--objective", "schedule-aware"], "schedule-aware needs exactly one of --speedup"),
    (["zoo", "digits-vae", "--steps", "0"], "argument --steps: 0 is not a whole number >= 1"),
    (["zoo", "digits-vae", "--threads", "0"], "argument --threads: 0 is not"),
])
def test_non_positive_numbers_are_refused_by_the_parser(argv, says, capsys, no_work):
    prog = "mmskip " + " ".join(argv[:2] if argv[0] == "eval" else argv[:1])
    line = one_error_line(capsys, argv, prog)
    assert says in line and line.endswith(f"(`{prog} --help` lists the options)")


@pytest.fixture(params=["proc", "file-parent"])
def unwritable(request, tmp_path):
    if request.param == "proc":
        return "/proc/mmskip-out/result.json"
    (tmp_path / "plain").write_text("x")
    return str(tmp_path / "plain" / "result.json")


@pytest.mark.parametrize("argv", [
    ["eval", "lm", "--out"], ["eval", "images", "--out"], ["analyze", "--model", "m", "--text", "t", "--out"],
    ["train", "--out"], ["zoo", "digits-vae", "--out"],
])
def test_an_unwritable_output_path_is_refused_before_any_work(argv, unwritable, capsys, no_work):
    prog = "mmskip " + " ".join(argv[:2] if argv[0] == "eval" else argv[:1])
    line = one_error_line(capsys, argv + [unwritable], prog)
    assert f"argument --out: cannot write {unwritable} (" in line and "pass a path in a folder you can write" in line
    if "plain" in unwritable:
        assert "plain is a file, not a folder" in line


def test_zoo_recipe_option_it_does_not_take_is_one_line(capsys, tmp_path, monkeypatch):
    import types

    from mmskip.cli import recipe

    train = recipe("zoo")
    fake = types.ModuleType("fake_recipe")
    fake.recipe = lambda out, steps=1: pytest.fail("the recipe ran")
    monkeypatch.setitem(sys.modules, "fake_recipe", fake)
    monkeypatch.setitem(train.RECIPES, "digits-vae", ("fake_recipe", "recipe"))
    line = one_error_line(capsys, ["zoo", "digits-vae", "--device", "cuda", "--out", str(tmp_path)], "mmskip zoo")
    assert "the 'digits-vae' recipe does not take --device; leave it out" in line


def test_train_unknown_model_is_one_line(capsys, tmp_path):
    line = one_error_line(capsys, ["train", "--model", "nope", "--out", str(tmp_path / "o")], "mmskip train")
    assert "--model nope: 'nope' is neither a zoo name (" in line


# -- the validators themselves -------------------------------------------------------------------------------


def test_writable_paths_leave_nothing_behind_and_keep_existing_files(tmp_path):
    target = tmp_path / "a" / "b" / "out.json"
    assert cli.writable_file(str(target)) == target and not (tmp_path / "a").exists()
    assert cli.writable_dir(str(tmp_path / "new" / "dir")) == tmp_path / "new" / "dir"
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept.json"
    kept.write_text(json.dumps({"x": 1}))
    assert cli.writable_file(str(kept)) == kept and kept.read_text() == '{"x": 1}'
    assert list(tmp_path.iterdir()) == [kept]
    with pytest.raises(argparse.ArgumentTypeError, match="it is a folder; name a file in it"):
        cli.writable_file(str(tmp_path))


@pytest.mark.parametrize("check, good, bad", [
    (cli.positive_int, ("1", "7"), ("0", "-1", "1.5", "x")),
    (cli.non_negative_int, ("0", "3"), ("-1", "")),
    (cli.positive_float, ("0.5", "2"), ("0", "-1", "nan", "inf")),
    (cli.fraction, ("0", "1", "0.3"), ("-0.1", "1.01", "nan")),
    (cli.proper_fraction, ("0", "0.99"), ("1", "-0.5")),
    (cli.at_least(3), ("3", "10"), ("2", "-3")),
])
def test_number_validators(check, good, bad):
    for text in good:
        check(text)
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=" is not "):
            check(text)
