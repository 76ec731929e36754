"""``python -m mmskip.train``: lists the objectives, trains a local model end to end, refuses bad flags."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from mmskip import zoo
from mmskip.train.__main__ import OBJECTIVES, main


@pytest.fixture
def tiny_folder(tmp_path):
    tok = AutoTokenizer.from_pretrained(zoo.path("stdlib-lm"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, pad_token_id=0, eos_token_id=0, bos_token_id=0)
    folder = tmp_path / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_help_lists_every_objective(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in OBJECTIVES:
        assert f"  {name} " in out
    assert "mmskip.train.first" in out  # where FiRST routers train


def test_trains_a_local_model_and_writes_a_loadable_folder(tiny_folder, tmp_path):
    out = tmp_path / "out"
    text = Path(__file__).read_text() * 4
    (tmp_path / "t.py").write_text(text)
    main(["--model", str(tiny_folder), "--out", str(out), "--text", str(tmp_path / "t.py"), "--objective",
          "layer-dropout", "early-exit", "--rotation", "2", "--steps", "3", "--batch", "2", "--seq-len", "32"])
    info = json.loads((out / "train_info.json").read_text())
    assert info["steps_done"] == 3 and info["objectives"][0].startswith("LayerDropout")
    assert (out / "checkpoint" / "trainer_state.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    before = AutoModelForCausalLM.from_pretrained(tiny_folder)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, before.model.layers[0].mlp.up_proj.weight)


def test_schedule_aware_lora_saves_the_adapter(tiny_folder, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "ft"
    text = Path(__file__).read_text() * 4
    (tmp_path / "t.py").write_text(text)
    main(["--model", str(tiny_folder), "--out", str(out), "--text", str(tmp_path / "t.py"), "--objective",
          "schedule-aware", "lm", "--skip", "1", "--lora", "--lora-rank", "2", "--steps", "2", "--batch", "2",
          "--seq-len", "32"])
    assert (out / "lora" / "adapter_model.safetensors").exists()
    assert "lora" not in json.dumps(list(AutoModelForCausalLM.from_pretrained(out).state_dict()))


def test_schedule_aware_needs_one_schedule(tiny_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tiny_folder), "--out", str(tmp_path / "x"), "--objective", "schedule-aware", "lm"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("mmskip train: error: schedule-aware needs exactly one of --speedup")
    assert err.count("\n") == 1 and not (tmp_path / "x").exists()  # one line, before any work
