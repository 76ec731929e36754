"""RelaCtrl: TDSM block, the control branch, skipping control positions, relevance, allocation, training."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxControlNetModel, SD3ControlNetModel
from mmskip.diffusion.relactrl import (
    ControlData,
    ControlTrainConfig,
    RelaCtrlFluxNet,
    RelevanceReport,
    TDSMBlock,
    UnsupportedControlNetError,
    allocate,
    control_positions,
    relevance,
    skipped_control,
    train_control,
)
from mmskip.diffusion.relactrl.tdsm import GroupedLinear, channel_shuffle

from ._tiny import tiny_sd3
from ._tiny_families import tiny_family


def _grid_ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.reshape(-1, 3)


def _flux_inputs(batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 16, 4, generator=g),
                encoder_hidden_states=torch.randn(batch, 8, 32, generator=g),
                pooled_projections=torch.randn(batch, 32, generator=g), timestep=torch.full((batch,), 0.6),
                img_ids=_grid_ids(4, 4), txt_ids=torch.zeros(8, 3))


def _randomise_projections(net: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "controlnet" in name:  # the zero-initialised embedder and projections
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture
def flux():
    torch.manual_seed(0)
    return tiny_family("flux").eval()


def _full(base) -> FluxControlNetModel:
    c = base.config
    torch.manual_seed(1)
    return FluxControlNetModel.from_transformer(base, num_layers=c.num_layers, num_single_layers=c.num_single_layers,
                                                attention_head_dim=c.attention_head_dim,
                                                num_attention_heads=c.num_attention_heads).eval()


def _controlled(base, net, inputs: dict, control: torch.Tensor) -> torch.Tensor:
    double, single = net(controlnet_cond=control, return_dict=False, **inputs)
    return base(controlnet_block_samples=double, controlnet_single_block_samples=single, return_dict=False,
                **inputs)[0]


# -- TDSM -------------------------------------------------------------------------------------------

def test_channel_shuffle_is_a_permutation_across_groups():
    x = torch.arange(8.0)
    y = channel_shuffle(x, 2)
    assert torch.equal(y, torch.tensor([0.0, 4, 1, 5, 2, 6, 3, 7]))
    assert torch.equal(channel_shuffle(channel_shuffle(torch.arange(12.0), 3), 4), torch.arange(12.0))


def test_grouped_linear_keeps_groups_apart():
    lin = GroupedLinear(8, 4, 2)
    x = torch.randn(3, 8)
    x2 = x.clone()
    x2[:, :4] += 1.0  # change only group 0's input
    d = lin(x2) - lin(x)
    assert d[:, :2].abs().sum() > 0 and torch.equal(d[:, 2:], torch.zeros(3, 2))
    with pytest.raises(ValueError, match="divide into"):
        GroupedLinear(10, 4, 4)


def test_tdsm_shapes_and_mixing_across_token_and_channel_groups():
    torch.manual_seed(0)
    dim, groups, grid = 16, 4, (4, 4)
    block = TDSMBlock(dim, groups=groups, window=2, mlp_ratio=2.0).eval()
    x = torch.randn(2, 16, dim)
    mod = torch.randn(2, 6 * dim) * 0.1
    y = block(x, mod, grid)
    assert y.shape == x.shape
    # one channel group changed at every token: every channel group of the output moves
    x_c = x.clone()
    x_c[..., : dim // groups] += 1.0
    d = (block(x_c, mod, grid) - y).abs().reshape(2, 16, groups, dim // groups).sum(dim=(0, 1, 3))
    assert (d > 1e-4).all(), d
    # one token changed: tokens outside its 2x2 local window move (through the shuffled windows)
    x_t = x.clone()
    x_t[:, 0] += torch.randn(dim)  # not a constant shift, which LayerNorm would remove
    moved = (block(x_t, mod, grid) - y).abs().sum(dim=(0, 2)).reshape(4, 4) > 1e-5
    local = torch.zeros(4, 4, dtype=torch.bool)
    local[:2, :2] = True
    assert moved[~local].any() and moved[local].all()
    # the shuffled windows of token (0, 0) are the tokens with even row and column: only they, and its
    # local window, are reached in one block
    reach = local.clone()
    reach[::2, ::2] = True
    assert not moved[~reach].any()


def test_tdsm_refuses_bad_configs():
    with pytest.raises(ValueError, match="even number of groups"):
        TDSMBlock(12, groups=3)
    block = TDSMBlock(16, groups=4, window=3)
    with pytest.raises(ValueError, match="does not divide"):
        block.check_grid((4, 4))


# -- the branch -------------------------------------------------------------------------------------

def test_relactrl_branch_at_zero_init_leaves_the_base_unchanged(flux):
    net = RelaCtrlFluxNet.from_transformer(flux, positions=(0, 3), mlp_ratios=(2.0, 1.0), window=2).eval()
    inputs = _flux_inputs()
    with torch.no_grad():
        plain = flux(return_dict=False, **inputs)[0]
        controlled = _controlled(flux, net, inputs, torch.randn(2, 16, 4))
    assert torch.equal(plain, controlled)
    _randomise_projections(net)
    with torch.no_grad():
        assert not torch.allclose(_controlled(flux, net, inputs, torch.randn(2, 16, 4)), plain)


def test_relactrl_branch_residuals_go_to_its_positions_only(flux):
    net = RelaCtrlFluxNet.from_transformer(flux, positions=(1, 4), mlp_ratios=(1.0, 1.0), window=2).eval()
    _randomise_projections(net)
    with torch.no_grad():
        double, single = net(controlnet_cond=torch.randn(2, 16, 4), return_dict=False, **_flux_inputs())
    assert len(double) == 2 and len(single) == 3
    assert not double[0].any() and double[1].abs().sum() > 0
    assert [s.abs().sum() > 0 for s in single] == [False, False, True]
    assert [p.name for p in net.control_positions()] == ["double.1", "single.2"]


def test_relactrl_branch_refuses_bad_configs(flux):
    with pytest.raises(ValueError, match="strictly increasing"):
        RelaCtrlFluxNet.from_transformer(flux, positions=(3, 1), mlp_ratios=(1.0, 1.0))
    with pytest.raises(ValueError, match="one mlp ratio per position"):
        RelaCtrlFluxNet.from_transformer(flux, positions=(0, 1), mlp_ratios=(1.0,))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        RelaCtrlFluxNet.from_transformer(flux, positions=(5,), mlp_ratios=(1.0,))
    net = RelaCtrlFluxNet.from_transformer(flux, positions=(0,), mlp_ratios=(1.0,), window=2)
    inputs = _flux_inputs()
    inputs["img_ids"] = _grid_ids(2, 8)
    inputs["hidden_states"] = inputs["hidden_states"][:, :8]
    with pytest.raises(ValueError, match="grid but there are"):
        net(controlnet_cond=torch.randn(2, 8, 4), **inputs)


def test_relactrl_branch_saves_and_loads(tmp_path, flux):
    net = RelaCtrlFluxNet.from_transformer(flux, positions=(0, 2), mlp_ratios=(2.0, 1.5), window=2).eval()
    _randomise_projections(net)
    net.save_pretrained(tmp_path)
    back = RelaCtrlFluxNet.from_pretrained(tmp_path).eval()
    inputs, control = _flux_inputs(), torch.randn(2, 16, 4)
    with torch.no_grad():
        assert torch.equal(_controlled(flux, net, inputs, control), _controlled(flux, back, inputs, control))


# -- positions and skipping ---------------------------------------------------------------------------

def test_control_positions_of_diffusers_controlnets(flux):
    assert [p.name for p in control_positions(_full(flux))] == ["double.0", "double.1", "single.0", "single.1",
                                                                 "single.2"]
    sd3 = SD3ControlNetModel.from_transformer(tiny_sd3(), num_layers=3)
    positions = control_positions(sd3)
    assert [p.name for p in positions] == ["double.0", "double.1", "double.2"]
    assert positions[1].projection is sd3.controlnet_blocks[1]
    with pytest.raises(UnsupportedControlNetError, match="no control blocks"):
        control_positions(torch.nn.Linear(2, 2))


def test_skipping_a_position_changes_the_output_and_restores_exactly(flux):
    net = _full(flux)
    _randomise_projections(net)
    inputs, control = _flux_inputs(), torch.randn(2, 16, 4)
    with torch.no_grad():
        before = _controlled(flux, net, inputs, control)
        with skipped_control(net, ["double.1", "single.2"]):
            skipped = _controlled(flux, net, inputs, control)
            double, single = net(controlnet_cond=control, return_dict=False, **inputs)
        after = _controlled(flux, net, inputs, control)
    assert not torch.allclose(before, skipped)
    assert not double[1].any() and not single[2].any()
    assert torch.equal(before, after)
    for module in net.modules():
        assert not hasattr(module, "_diffusers_hook") and "forward" not in module.__dict__
    with pytest.raises(ValueError, match="unknown control positions"):
        with skipped_control(net, ["double.7"]):
            pass


def test_skipping_every_position_gives_the_base_output(flux):
    net = _full(flux)
    _randomise_projections(net)
    inputs = _flux_inputs()
    with torch.no_grad(), skipped_control(net, [p.name for p in control_positions(net)]):
        assert torch.equal(_controlled(flux, net, inputs, torch.randn(2, 16, 4)), flux(return_dict=False, **inputs)[0])


def test_skipping_an_sd3_control_block_passes_its_input_on():
    base = tiny_sd3()
    torch.manual_seed(2)
    net = SD3ControlNetModel.from_transformer(base, num_layers=3).eval()
    _randomise_projections(net)
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), controlnet_cond=torch.randn(2, 5, 8, 8, generator=g),
              encoder_hidden_states=torch.randn(2, 6, 16, generator=g), pooled_projections=torch.randn(2, 8, generator=g),
              timestep=torch.full((2,), 500.0), return_dict=False)
    with torch.no_grad():
        (plain,) = net(**kw)
        with skipped_control(net, ["double.0"]):
            (skipped,) = net(**kw)
        (again,) = net(**kw)
    assert not skipped[0].any() and not torch.allclose(skipped[1], plain[1])
    assert all(torch.equal(a, b) for a, b in zip(plain, again, strict=True))


def test_skipping_a_tdsm_position(flux):
    net = RelaCtrlFluxNet.from_transformer(flux, positions=(0, 2), mlp_ratios=(1.0, 1.0), window=2).eval()
    _randomise_projections(net)
    with torch.no_grad(), skipped_control(net, ["double.0"]):
        double, single = net(controlnet_cond=torch.randn(2, 16, 4), return_dict=False, **_flux_inputs())
    assert not double[0].any() and single[0].abs().sum() > 0


# -- relevance and allocation -------------------------------------------------------------------------

class _FakePipe:
    """A 'pipeline' whose image is the tiny Flux output with the branch's residuals: enough for relevance()."""

    def __init__(self, base, controlnet) -> None:
        self.transformer, self.controlnet = base, controlnet

    def __call__(self, prompt, control_image, generator, output_type, **kw):
        inputs = _flux_inputs(len(prompt), seed=int(generator.initial_seed()))
        cond = control_image.reshape(len(prompt), 16, -1)[..., :4]
        with torch.no_grad():
            out = _controlled(self.transformer, self.controlnet, inputs, cond)
        return type("Out", (), {"images": out.reshape(len(prompt), 1, 16, 4)})()


def test_relevance_scores_positions_and_restores_the_pipeline(tmp_path, flux):
    net = _full(flux)
    _randomise_projections(net)
    pipe = _FakePipe(flux, net)
    controls = torch.randn(4, 1, 16, 4)
    ref = controls.clone()

    def quality_loss(images):
        return float((images - ref).pow(2).mean())

    def fidelity(images, c):
        return -float((images - c).abs().mean())

    before = pipe(["a"] * 4, controls, torch.Generator().manual_seed(0), "pt").images
    report = relevance(pipe, ["a"] * 4, controls, quality_loss=quality_loss, fidelity=fidelity, batch_size=2,
                       progress=False)
    after = pipe(["a"] * 4, controls, torch.Generator().manual_seed(0), "pt").images
    assert torch.equal(before, after)
    assert report.positions == ["double.0", "double.1", "single.0", "single.1", "single.2"]
    assert max(report.scores) == pytest.approx(1.0) and min(report.scores) >= 0.0
    assert report.ranking()[0] == report.positions[report.scores.index(max(report.scores))]
    assert len(report.least_relevant(2)) == 2 and report.ranking()[-1] == report.least_relevant(1)[0]
    report.save(tmp_path / "r.json")
    assert RelevanceReport.load(tmp_path / "r.json") == report
    assert report.plot(tmp_path / "r.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="one control per prompt"):
        relevance(pipe, ["a"] * 3, controls, quality_loss=quality_loss, fidelity=fidelity)
    with pytest.raises(ValueError, match="weight"):
        relevance(pipe, ["a"] * 4, controls, quality_loss=quality_loss, fidelity=fidelity, weight=1.5)


def test_report_combines_normalised_drops():
    r = RelevanceReport(["a", "b", "c"], [0, 1, 2], quality_loss=[10.0, 20.0, 12.0], fidelity=[0.5, 0.9, 0.1],
                        baseline={"quality_loss": 10.0, "fidelity": 0.9}, weight=0.5)
    # quality drops 0, 10, 2 -> 0, 1, 0.2; fidelity drops 0.4, 0, 0.8 -> 0.5, 0, 1
    assert r.scores == pytest.approx([0.25, 0.5, 0.6])
    assert r.ranking() == ["c", "b", "a"]


def test_allocate_takes_the_most_relevant_positions_and_scales_width():
    r = RelevanceReport(["p0", "p1", "p2", "p3"], [0, 1, 2, 3], [0.0] * 4, [0.0] * 4,
                        {"quality_loss": 0.0, "fidelity": 0.0}, 0.5, scores=[0.9, 0.1, 1.0, 0.5])
    plan = allocate(r, 3, max_ratio=4.0, min_ratio=1.0)
    assert plan.positions == (0, 2, 3)
    assert plan.mlp_ratios == (3.5, 4.0, 1.0)
    with pytest.raises(ValueError, match="num_blocks"):
        allocate(r, 5)


# -- training ---------------------------------------------------------------------------------------

def _data(n: int = 6) -> ControlData:
    g = torch.Generator().manual_seed(0)
    return ControlData(latents=torch.randn(n, 1, 8, 8, generator=g), control_mean=torch.randn(n, 1, 8, 8, generator=g),
                       control_std=torch.full((n, 1, 8, 8), 0.1), prompt_embeds=torch.randn(n, 8, 32, generator=g),
                       pooled=torch.randn(n, 32, generator=g), empty_embeds=torch.zeros(1, 8, 32),
                       empty_pooled=torch.zeros(1, 32))


def test_train_control_learns_only_the_branch_and_resumes(tmp_path, flux):
    net = RelaCtrlFluxNet.from_transformer(flux, positions=(1,), mlp_ratios=(1.0,), window=2)
    base_state = {k: v.clone() for k, v in flux.state_dict().items()}
    cfg = ControlTrainConfig(steps=2, batch=3, warmup=1, checkpoint_every=1)
    ema = train_control(net, flux, _data(), cfg, out=tmp_path)
    assert all(torch.equal(v, flux.state_dict()[k]) for k, v in base_state.items())
    assert net.controlnet_blocks[0].weight.abs().sum() > 0  # the zero projection has started to learn
    assert ema.steps_done == 2
    longer = ControlTrainConfig(steps=3, batch=3, warmup=1, checkpoint_every=1)
    resumed = train_control(RelaCtrlFluxNet.from_transformer(flux, positions=(1,), mlp_ratios=(1.0,), window=2),
                            flux, _data(), longer, out=tmp_path)
    assert resumed.steps_done == 3
    with pytest.raises(ValueError, match="rows"):
        ControlData(torch.zeros(2, 1, 8, 8), torch.zeros(3, 1, 8, 8), torch.zeros(2, 1, 8, 8), torch.zeros(2, 8, 32),
                    torch.zeros(2, 32), torch.zeros(1, 8, 32), torch.zeros(1, 32))


def test_block_io_rebuilds_both_streams_before_it_has_seen_an_output():
    from diffusers.models.transformers.transformer_flux import FluxTransformerBlock
    from mmskip.diffusion.adapters.block_registry import registry_io

    registry_io.cache_clear()
    h, e = torch.zeros(1, 2, 4), torch.ones(1, 3, 4)
    out = registry_io(FluxTransformerBlock).build((h, e), (), {})
    assert isinstance(out, tuple) and out[0] is e and out[1] is h
