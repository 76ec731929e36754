"""``mmskip tune``: a run on a local model folder writes the result; user errors are one line."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mmskip import zoo
from mmskip.cli import main as mmskip_main
from mmskip.tuning.cli import parse_floor


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    """A tiny Llama with the zoo LM's tokenizer, saved like a user's model folder."""
    _, tok = zoo.load("stdlib-lm")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, pad_token_id=0)
    folder = tmp_path_factory.mktemp("lm")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_tune_writes_result_table_and_plot(lm_folder, tmp_path, capsys):
    out = tmp_path / "tuned"
    code = mmskip_main(["tune", "--model", str(lm_folder), "--floor", "agreement=0", "--budget", "3", "--inputs", "2",
                        "--held-out", "2", "--max-new-tokens", "4", "--repeats", "3", "--finalists", "1",
                        "--out", str(out), "--no-progress"])
    assert code == 0
    saved = json.loads((out / "mmskip_tune.json").read_text())
    assert saved["metric"] == "agreement" and saved["floor"] == 0 and saved["trials"] == 3
    assert (out / "trials.jsonl").is_file() and (out / "front.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "speedup (median, IQR)" in printed and (out / "front.md").read_text().strip() in printed


@pytest.mark.parametrize("args, match", [
    (["--model", "no-such-model"], "neither a zoo name"),
    (["--model", "stdlib-lm", "--budget", "soon"], "--budget"),
    (["--model", "stdlib-lm", "--floor", "psnr=high"], "METRIC=NUMBER"),
    (["--model", "stdlib-lm", "--inputs", "0"], "--inputs"),
    (["--model", "stdlib-lm", "--ray-address", "auto"], "--backend ray"),
])
def test_user_errors_are_one_line(args, match, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        code = mmskip_main(["tune", "--out", str(tmp_path), *args])
        raise SystemExit(code)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err and "Traceback" not in err


def test_parse_floor():
    assert parse_floor("psnr=35") == ("psnr", 35.0) and parse_floor("0.9") == (None, 0.9) and parse_floor(None) == (None, None)
