"""benchmarks/vision_tokens_sweep.py --smoke, image (p-MoD) and video (VideoLLM-MoD) families: every method
at every keep ratio on the same questions, the FLOPs each one leaves, the paired margins, and that the
model comes back unchanged."""

import json

import pytest
import torch


@pytest.mark.parametrize(("flags", "method", "family", "model"), [
    ([], "p-MoD", "image", "tiny-random-llava"),
    (["--family", "video"], "VideoLLM-MoD", "video", "tiny-random-video"),
])
def test_vision_tokens_sweep_smoke(load_bench, tmp_path, threads, flags, method, family, model):
    bench = load_bench("vision_tokens_sweep")
    out = tmp_path / "sweep.json"
    res = bench.main(["--smoke", *flags, "--out", str(out)])
    assert json.loads(out.read_text())["summary"] == json.loads(json.dumps(res["summary"]))
    assert (res["meta"]["family"], res["meta"]["method"], res["meta"]["model"]) == (family, method, model)
    rows = res["rows"]
    assert [(r["name"], r["ratio"]) for r in rows] == [
        ("unmodified", 1.0),
        (f"{method} attention", 0.5), (f"{method} norm", 0.5), ("random", 0.5), ("pool 1x2", 0.5),
        (f"{method} attention", 0.25), (f"{method} norm", 0.25), ("random", 0.25), ("pool 2x2", 0.25)]
    by = {(r["name"], r["ratio"]): r for r in rows}
    assert by["unmodified", 1.0]["flops_fraction"] == 1.0 and by["unmodified", 1.0]["agree_unmodified"] == 1.0
    for r in (0.5, 0.25):
        # random dropping keeps the MoD config's per-layer counts and costs no signal: the norm signal's FLOPs
        assert by["random", r]["flops_fraction"] == pytest.approx(by[f"{method} norm", r]["flops_fraction"])
        assert by["random", r]["flops_fraction"] < by[f"{method} attention", r]["flops_fraction"] < 1.0
    assert by["random", 0.25]["flops_fraction"] < by["random", 0.5]["flops_fraction"]
    assert by["pool 2x2", 0.25]["flops_fraction"] < by["pool 1x2", 0.5]["flops_fraction"] < 1.0
    for r in rows:
        assert 0 <= r["right"] <= res["meta"]["questions"]
        assert r["acc_all"] == pytest.approx(r["right"] / res["meta"]["questions"])
    assert [s["ratio"] for s in res["summary"]] == [0.5, 0.25]
    assert out.with_suffix(".png").stat().st_size > 0 and "Best config at each keep ratio" in out.with_suffix(".md").read_text()


def test_paired_margin_is_the_mean_difference_and_its_standard_error(load_bench):
    bench = load_bench("vision_tokens_sweep")
    diff, se = bench.paired_margin([True, True, False, True], [False, True, False, False])
    assert diff == pytest.approx(0.5)  # differences 1, 0, 0, 1
    assert se == pytest.approx((1 / 3) ** 0.5 / 2)  # sample variance 1/3, over 4 questions


def test_routers_need_a_ratio(load_bench):
    bench = load_bench("vision_tokens_sweep")
    assert bench.router_folders(["0.25=runs/r", "0.25=runs/s"]) == [(0.25, "runs/r"), (0.25, "runs/s")]
    with pytest.raises(SystemExit, match="RATIO=FOLDER"):
        bench.router_folders(["runs/r"])


def test_family_follows_the_flag_else_the_model_name(load_bench):
    load_bench("vision_tokens_sweep")  # puts benchmarks/ on sys.path
    fam = load_bench("_sweep_families")
    assert fam.family_for(None, "digits-video") is fam.VIDEO
    assert fam.family_for(None, "tiny-random-video") is fam.VIDEO
    assert fam.family_for(None, None) is fam.IMAGE and fam.family_for(None, "runs/zoo/x") is fam.IMAGE
    assert fam.family_for("video", "runs/zoo/x") is fam.VIDEO


def test_video_pooling_shrinks_each_frame_and_is_undone(load_bench, threads):
    bench = load_bench("vision_tokens_sweep")
    fam = bench.FAMILIES["video"]
    model, tok = fam.build_model(fam.smoke_model)
    data = fam.questions(tok, 4)
    rows = fam.probe(data, 2)
    plain = model(**fam.inputs(tok, data, rows, fam.n_tokens)).logits
    att = bench.Applied(model, fam, "pool", 0.25)
    assert att.n_tokens == fam.n_tokens // 4
    pooled = model(**fam.inputs(tok, data, rows, att.n_tokens)).logits  # the placeholders match the pooled frames
    att.remove()
    assert pooled.shape[1] < plain.shape[1]
    assert torch.equal(model(**fam.inputs(tok, data, rows, fam.n_tokens)).logits, plain)


def test_routers_trained_with_lora_run_on_the_merged_model(load_bench, tmp_path, threads):
    from mmskip.vision.pmod import train as T

    from mmskip.registry import get_adapter

    bench = load_bench("vision_tokens_sweep")
    fam = bench.FAMILIES["image"]
    model, tok = fam.build_model(fam.smoke_model)
    data = fam.questions(tok, 4)
    L = get_adapter(model, "vlm").num_layers
    batch = fam.inputs(tok, data, fam.probe(data, 4), fam.n_tokens)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -1] = batch["input_ids"][:, -1]
    cfg = fam.config([1.0] + [0.25] * (L - 1), "attention", None)
    for folder, lora in ((tmp_path / "plain", None), (tmp_path / "lora", True)):
        T.train_mod_routers(model, cfg, [{**batch, "labels": labels}], steps=2, lr=1e-2, out=folder, lora=lora,
                            progress=False)
    todo = bench.setups([0.25], [(0.25, str(tmp_path / "plain")), (0.25, str(tmp_path / "lora"))])
    assert [(s["name"], s.get("lora")) for s in todo if "routers" in s] == [("p-MoD router", False),
                                                                          ("p-MoD router + LoRA", True)]
    res = bench.main(["--smoke", "--routers", f"0.25={tmp_path / 'plain'}", f"0.25={tmp_path / 'lora'}",
                      "--out", str(tmp_path / "sweep.json")])
    rows = {r["name"]: r for r in res["rows"] if r["ratio"] == 0.25}
    assert {"p-MoD router", "p-MoD router + LoRA"} <= set(rows)
    # the LoRA row ran on a merged copy of the same shapes: the same FLOPs as the routers without LoRA
    assert rows["p-MoD router + LoRA"]["flops_fraction"] == pytest.approx(rows["p-MoD router"]["flops_fraction"])
