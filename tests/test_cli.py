import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mmskip import cli, demo

from .conftest import tiny_lm


def test_help_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "analyze" in out


def test_unknown_command_fails(capsys):
    assert cli.main(["frobnicate"]) == 2


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


def test_language_demo_runs_every_technique(tiny_lm_folder, capsys):
    rows = demo.language_demo(str(tiny_lm_folder), new_tokens=6)
    assert [r["config"] for r in rows][0] == "full model"
    assert len(rows) == 5
    assert rows[0]["agreement"] == 1.0 and rows[0]["flops_bound"] == 1.0
    assert rows[2]["skipped_layers"] == [1, 3, 5, 6] and rows[2]["flops_bound"] > 1.0
    assert "Unified" in capsys.readouterr().out
