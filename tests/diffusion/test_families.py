"""Feature inheritance on the families diffusers' block registry describes (tiny random configs).

Flux, Flux2, Qwen-Image, Z-Image, Wan, HunyuanVideo, LTX-Video, CogVideoX: block I/O is read
from diffusers' ``TransformerBlockRegistry``, not from a table of mmskip's own.
"""

from __future__ import annotations

import pytest
import torch
from mmskip.diffusion import FeatureInheritanceConfig
from mmskip.diffusion.adapters.block_registry import registered_block_classes, registry_io
from mmskip.diffusion.adapters.denoisers import _IO_BY_CLASS, registry_families
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mmskip.inject import applied, apply
from mmskip.registry import UnsupportedModelError, get_adapter, supported
from mmskip.schedules import adaptive, interval

from ._tiny import target_modules
from ._tiny_families import FAMILIES, family_inputs, family_timesteps, tiny_family

STACKS = {
    "flux": ("transformer_blocks", "single_transformer_blocks"),
    "flux2": ("transformer_blocks", "single_transformer_blocks"),
    "qwen_image": ("transformer_blocks",),
    "z_image": ("noise_refiner", "context_refiner", "layers"),
    "wan": ("blocks",),
    "hunyuan_video": ("transformer_blocks", "single_transformer_blocks"),
    "ltx": ("transformer_blocks",),
    "cogvideox": ("transformer_blocks",),
}


def _sample(out):
    s = out[0] if isinstance(out, tuple) else out.sample
    return torch.stack(s) if isinstance(s, list) else s


def _run(m, fam):
    with torch.no_grad():
        return [_sample(m(**family_inputs(m, t))) for t in family_timesteps(fam)]


def _leaf_counts(m, names):
    counts, hooks = {}, []
    for n in names:
        for sub, mod in m.get_submodule(n).named_modules():
            if sub and not list(mod.children()) and list(mod.parameters()):
                key = f"{n}.{sub}"
                counts[key] = 0
                hooks.append(mod.register_forward_pre_hook(lambda mod, a, key=key: counts.__setitem__(key, counts[key] + 1)))
    return counts, hooks


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param, tiny_family(request.param)


def test_block_io_comes_from_diffusers_registry(family):
    fam, m = family
    ad = get_adapter(m, "diffusion")
    assert ad.stacks == STACKS[fam]
    for stack in ad.stacks:
        block = m.get_submodule(stack)[0]
        assert ad.io(block) is registry_io(type(block)) is not None
    # the hand table only describes what diffusers does not (the UNet's units)
    described = {c.__name__ for c in registered_block_classes()}
    assert not described & set(_IO_BY_CLASS)


@pytest.mark.parametrize("granularity", ["block", "layer", "unit"])
def test_inherit_steps_skip_targets_and_remove_restores(family, granularity):
    fam, m = family
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with FlopCounterMode(display=False) as fc:
        ref = _run(m, fam)
    full = fc.get_total_flops()
    cfg = FeatureInheritanceConfig(schedule=interval(2), granularity=granularity)
    with applied(m, cfg) as h:
        targets = h.stats()["targets"]
    counts, hooks = _leaf_counts(m, target_modules(targets))
    assert counts
    _run(m, fam)
    full_counts = dict(counts)
    counts.update(dict.fromkeys(counts, 0))
    handle = apply(m, cfg)
    with FlopCounterMode(display=False) as fc:
        out = _run(m, fam)
    for h in hooks:
        h.remove()
    stats = handle.stats()
    handle.remove()
    assert stats["recomputed_steps"] == [0, 2]
    assert all(2 * counts[k] == full_counts[k] for k in counts), counts  # ran on steps 0 and 2 only
    assert torch.equal(out[0], ref[0]) and torch.equal(out[2], ref[2])
    assert not torch.equal(out[1], ref[1]) and torch.isfinite(out[1]).all()
    assert fc.get_total_flops() < full
    assert stats["flops_fraction"] == pytest.approx(fc.get_total_flops() / full, rel=1e-9)
    # remove() restores exactly: no hooks left, same weights, same outputs
    assert not any(hasattr(mod, "_diffusers_hook") and mod._diffusers_hook.hooks for mod in m.modules())
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(_run(m, fam), ref, strict=True))


def test_recompute_every_step_equals_the_model(family):
    fam, m = family
    ref = _run(m, fam)
    with applied(m, FeatureInheritanceConfig(schedule=interval(1))) as h:
        out = _run(m, fam)
        assert h.stats()["recomputed_steps"] == [0, 1, 2, 3]
    assert all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))


def test_adaptive_probe_on_first_main_block(family):
    fam, m = family
    with applied(m, FeatureInheritanceConfig(schedule=adaptive(1e9, "relative_change"))) as h:
        _run(m, fam)
        st = h.stats()
    # an enormous threshold never recomputes after step 0: the probe decided every step
    assert st["recomputed_steps"] == [0] and st["inherited_steps"] == 3
    assert len(st["probe_changes"]) == 4


def test_ranges_over_every_stack():
    m = tiny_family("flux")
    cfg = FeatureInheritanceConfig(schedule=interval(2), targets=("transformer_blocks.0:2", "single_transformer_blocks.1:3"))
    with applied(m, cfg) as h:
        _run(m, "flux")
        assert h.stats()["items"]["single_transformer_blocks.1:3"]["skipped"] == 2
    with pytest.raises(ValueError, match="'transformer_blocks.a:b' or 'single_transformer_blocks.a:b'"):
        apply(m, FeatureInheritanceConfig(targets=("proj_out.0:2",)))
    with pytest.raises(ValueError, match="outside"):
        apply(m, FeatureInheritanceConfig(targets=("single_transformer_blocks.0:9",)))


def test_registry_families_lists_the_issue_families():
    fams = registry_families()
    for name in (
        "FluxTransformer2DModel", "Flux2Transformer2DModel", "QwenImageTransformer2DModel", "ZImageTransformer2DModel",
        "WanTransformer3DModel", "HunyuanVideoTransformer3DModel", "LTXVideoTransformer3DModel",
        "CogVideoXTransformer3DModel", "DiTTransformer2DModel", "SD3Transformer2DModel",
    ):
        assert name in fams
    assert "WanTransformerBlock" in fams["WanTransformer3DModel"]
    assert {"FluxTransformer2DModel", "WanTransformer3DModel"} <= set(supported("diffusion"))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, hidden_states, timestep=None):
        return hidden_states + self.lin(hidden_states)


class _Unregistered(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])

    def forward(self, hidden_states, timestep):
        for b in self.blocks:
            hidden_states = b(hidden_states)
        return hidden_states


def test_family_without_block_metadata_is_refused():
    m = _Unregistered()
    before = [p.clone() for p in m.parameters()]
    with pytest.raises(UnsupportedModelError, match="TransformerBlockRegistry"):
        apply(m, FeatureInheritanceConfig())
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters(), strict=True))
    assert not any(hasattr(mod, "_diffusers_hook") for mod in m.modules())


@pytest.mark.parametrize("name", sorted(registry_families()))
def test_every_registry_family_gets_an_adapter(name):
    """Each family diffusers' caches support, at its default (full) size on the meta device."""
    import diffusers

    with torch.device("meta"):
        m = getattr(diffusers, name)()
    ad = get_adapter(m, "diffusion")
    assert ad.stacks and all(ad.io(m.get_submodule(s)[0]) is not None for s in ad.stacks)
    assert ad.defaults("block") and ad.candidates("layer")
    assert ad.time_sign == (-1.0 if name in ("ZImageTransformer2DModel", "MochiTransformer3DModel") else 1.0)
