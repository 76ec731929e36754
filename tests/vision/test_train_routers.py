"""Training p-MoD routers (mmskip.vision.pmod.train) on a tiny random LLaVA, CPU float32."""

from __future__ import annotations

import json

import pytest
import torch
from mmskip.vision import MoDConfig, MoDRouters
from mmskip.vision.pmod import train as T

import mmskip
from mmskip import schedules, zoo

from ._tiny import padded_prompts, tiny_llava


def _batches(n: int = 2) -> list[dict[str, torch.Tensor]]:
    """Left-padded prompts with the last two tokens as the answer (labels -100 elsewhere)."""
    out = []
    for seed in range(n):
        b = padded_prompts(seed=seed + 1)
        labels = torch.full_like(b["input_ids"], -100)
        labels[:, -2:] = b["input_ids"][:, -2:]
        out.append({**b, "labels": labels})
    return out


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [p.requires_grad for p in model.parameters()],
            model.training, set(vars(model)))


def _assert_unchanged(model, snap) -> None:
    state, flags, training, attrs = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], v) for k, v in state.items())  # bit-identical base weights
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.training == training
    assert set(vars(model)) == attrs  # no handle, no peft_config left behind
    assert not any("_diffusers_hook" in m.__dict__ or "forward" in m.__dict__ for m in model.modules())
    assert not any("lora" in n for n, _ in model.named_modules())


def test_training_moves_routers_and_leaves_model_unchanged(tmp_path):
    model = tiny_llava()
    snap = _snapshot(model)
    data = _batches()
    routers = T.train_mod_routers(model, MoDConfig(), data, steps=3, lr=1e-2, out=tmp_path, progress=False,
                                  meta={"note": "test"})
    assert any(bool(p.abs().sum() > 0) for p in routers.parameters())  # zero-initialised, now trained
    _assert_unchanged(model, snap)
    info = json.loads((tmp_path / "mod_routers.json").read_text())["meta"]
    assert info["steps"] == 3 and info["lr"] == 1e-2 and info["note"] == "test"
    assert info["schedule"]["kind"] == "progressive" and info["mod_layers"] == routers.layers
    assert len(info["loss_curve"]) == 3 and info["lora"] is None

    loaded = MoDRouters.load(tmp_path)
    assert all(torch.equal(a, b.float()) for a, b in zip(loaded.state_dict().values(), routers.state_dict().values()))
    inputs = {k: v for k, v in data[0].items() if k != "labels"}
    with torch.no_grad():
        plain = model(**inputs).logits
        with mmskip.applied(model, MoDConfig(signal="router", routers=str(tmp_path))) as h:
            routed = model(**inputs).logits
            assert h.stats()["mode"] == "mod" and h.stats()["prefill_flops_fraction"] < 1.0
    assert torch.isfinite(routed).all() and not torch.allclose(routed, plain)
    _assert_unchanged(model, snap)


def test_resume_continues_the_step_count(tmp_path):
    model = tiny_llava()
    cfg = MoDConfig(schedule=schedules.explicit(ratios=[1.0, 1.0, 0.5, 0.25]))
    straight = T.train_mod_routers(model, cfg, _batches(), steps=4, lr=1e-2, out=tmp_path / "a", progress=False)

    used = []

    def stream():
        for i in range(100):
            used.append(i)
            yield _batches()[i % 2]

    T.train_mod_routers(model, cfg, stream(), steps=2, lr=1e-2, out=tmp_path / "b", progress=False,
                        checkpoint_every=1)
    assert json.loads((tmp_path / "b" / T.CHECKPOINT).read_text())["step"] == 2
    used.clear()
    resumed = T.train_mod_routers(model, cfg, stream(), steps=4, lr=1e-2, out=tmp_path / "b", progress=False,
                                  resume=True)
    assert used == [0, 1, 2, 3]  # the first two batches are skipped, two more train
    assert resumed.meta["steps"] == 4 and len(resumed.meta["loss_curve"]) == 4
    assert json.loads((tmp_path / "b" / T.CHECKPOINT).read_text())["step"] == 4
    for a, b in zip(straight.parameters(), resumed.parameters()):  # same as an uninterrupted run
        torch.testing.assert_close(a, b)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        T.train_mod_routers(model, cfg, _batches(), steps=2, out=tmp_path / "none", resume=True, progress=False)
    with pytest.raises(ValueError, match="schedule"):  # another schedule's checkpoint
        T.train_mod_routers(model, MoDConfig(), _batches(), steps=6, out=tmp_path / "b", resume=True, progress=False)


def test_lora_trains_only_adapter_and_router_params(tmp_path):
    model = tiny_llava()
    snap = _snapshot(model)
    trainable: list[list[str]] = []
    hook = model.register_forward_pre_hook(
        lambda m, a: trainable.append([n for n, p in m.named_parameters() if p.requires_grad]))
    try:
        routers = T.train_mod_routers(model, MoDConfig(), _batches(), steps=3, lr=1e-2, out=tmp_path, lora=True,
                                      progress=False)
    finally:
        hook.remove()
    assert trainable and all(names and all("lora_" in n for n in names) for names in trainable)
    assert {n.split(".self_attn.")[1].split(".")[0] for n in trainable[0]} == {"q_proj", "v_proj"}
    assert all(".language_model." in n for n in trainable[0])
    assert any(bool(p.abs().sum() > 0) for p in routers.parameters())
    _assert_unchanged(model, snap)

    from safetensors.torch import load_file

    lora = load_file(str(tmp_path / T.LORA_WEIGHTS))
    assert lora and all("lora_" in k for k in lora)
    assert any(bool(v.abs().sum() > 0) for k, v in lora.items() if "lora_B" in k)  # B starts at zero
    assert routers.meta["lora"]["r"] == 8

    merged = T.merged_with_lora(model, tmp_path)
    _assert_unchanged(model, snap)
    q = "model.language_model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q], model.state_dict()[q])
    assert torch.equal(merged.state_dict()["lm_head.weight"], model.state_dict()["lm_head.weight"])
    with mmskip.applied(merged, MoDConfig(signal="router", routers=str(tmp_path))), torch.no_grad():
        assert torch.isfinite(merged(**padded_prompts()).logits).all()

    with pytest.raises(ValueError, match="trained with LoRA"):  # resume must match
        T.train_mod_routers(model, MoDConfig(), _batches(), steps=5, out=tmp_path, resume=True, progress=False)
    T.train_mod_routers(model, MoDConfig(), _batches(), steps=4, out=tmp_path, resume=True, lora=True, progress=False)
    _assert_unchanged(model, snap)


def test_bad_arguments(tmp_path):
    model = tiny_llava()
    with pytest.raises(TypeError, match="MoD config"):
        T.train_mod_routers(model, mmskip.LayerSkipConfig(), _batches(), steps=1, out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="labels"):
        T.train_mod_routers(model, MoDConfig(), [padded_prompts()], steps=1, out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="ran out"):
        T.train_mod_routers(model, MoDConfig(), iter(_batches(1)), steps=2, out=tmp_path / "x", progress=False)
    assert not any("_diffusers_hook" in m.__dict__ for m in model.modules())


def test_cli_errors_exit_2(tmp_path, capsys):
    assert T.main(["--model", "no-such-model", "--out", str(tmp_path / "o")]) == 2
    assert "unknown zoo model 'no-such-model'" in capsys.readouterr().err
    assert T.main(["--out", str(tmp_path / "o"), "--resume"]) == 2
    assert "--resume: no checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        T.main(["--model", "digits-llava"])
    assert e.value.code == 2 and "--out" in capsys.readouterr().err
    (tmp_path / "c" / T.CHECKPOINT).parent.mkdir(parents=True)
    (tmp_path / "c" / T.CHECKPOINT).write_bytes(b"")
    assert T.main(["--out", str(tmp_path / "c")]) == 2
    assert "--resume to continue" in capsys.readouterr().err
    if "stdlib-lm" in zoo.available():
        assert T.main(["--model", "stdlib-lm", "--out", str(tmp_path / "o")]) == 2
        assert "not a vision-language model" in capsys.readouterr().err


@pytest.mark.skipif("digits-llava" not in zoo.available(), reason="zoo model digits-llava not present")
def test_cli_end_to_end_on_digits_llava(tmp_path, capsys):
    out = tmp_path / "r"
    assert T.main(["--out", str(out), "--steps", "1", "--batch", "2", "--eval-n", "2", "--no-progress"]) == 0
    res = json.loads((out / "eval.json").read_text())
    assert [r["signal"] for r in res["rows"]] == ["-", "router", "attention", "norm"]
    assert res["rows"][0]["prefill_flops_fraction"] == 1.0
    assert all(r["prefill_flops_fraction"] < 1.0 for r in res["rows"][1:])
    assert "| p-MoD progressive | router |" in capsys.readouterr().out
    assert T.main(["--out", str(out), "--steps", "1", "--eval-n", "0", "--resume"]) == 0  # nothing left to train


def test_any_mod_config_with_router_fields(tmp_path):
    """Written against the fields, not MoDConfig: VideoMoDConfig's routers train the same way."""
    vision = pytest.importorskip("mmskip.vision")
    if not hasattr(vision, "VideoMoDConfig"):
        pytest.skip("mmskip.vision.VideoMoDConfig not available")
    from ._tiny import onevision_video_prompts, tiny_onevision

    model = tiny_onevision()
    snap = _snapshot(model)
    b = onevision_video_prompts((1, 2), frames=3)
    labels = torch.full_like(b["input_ids"], -100)
    labels[:, -2:] = b["input_ids"][:, -2:]
    cfg = vision.VideoMoDConfig(schedule=schedules.constant(0.5))
    routers = T.train_mod_routers(model, cfg, [{**b, "labels": labels}], steps=2, lr=1e-2, out=tmp_path,
                                  progress=False)
    assert routers.meta["technique"] == cfg.technique and routers.layers == [1, 2, 3]
    assert any(bool(p.abs().sum() > 0) for p in routers.parameters())
    _assert_unchanged(model, snap)
    with mmskip.applied(model, vision.VideoMoDConfig(schedule=schedules.constant(0.5), signal="router",
                                                     routers=str(tmp_path))), torch.no_grad():
        assert torch.isfinite(model(**b).logits).all()


@pytest.mark.skipif("digits-video" not in zoo.available(), reason="zoo model digits-video not present")
def test_cli_trains_videollm_mod_routers_on_digits_video(tmp_path, capsys):
    from mmskip.vision.pmod.eval import heldout, load_model, video_batches

    from mmskip.zoo import video_data as D

    model, tok = load_model("digits-video")
    b = next(video_batches(tok, 3, seed=1))
    assert set(b) == {"input_ids", "attention_mask", "pixel_values_videos", "labels"}
    assert ((b["labels"] != -100).sum(1) == 2).all()  # the answer and </s>
    assert (b["input_ids"] == tok.convert_tokens_to_ids(D.VIDEO_TOKEN)).sum() == \
        b["pixel_values_videos"].shape[0] * D.N_CLIP_TOKENS  # 65 video tokens a clip
    data = heldout(tok, 2, video=True)
    assert data.qtypes == [t for t in D.QTYPES for _ in range(2)]
    out = tmp_path / "v"
    assert T.main(["--model", "digits-video", "--out", str(out), "--steps", "1", "--batch", "2", "--eval-n", "2",
                   "--no-progress"]) == 0
    res = json.loads((out / "eval.json").read_text())
    assert [r["signal"] for r in res["rows"]] == ["-", "router", "attention", "norm"]
    assert json.loads((out / "mod_routers.json").read_text())["meta"]["technique"] == "videomod"
    assert all(r["prefill_flops_fraction"] < 1.0 for r in res["rows"][1:])
    printed = capsys.readouterr().out
    assert "| VideoLLM-MoD progressive | router |" in printed and "acc digit / count / first / any / all" in printed
