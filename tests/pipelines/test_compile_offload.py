"""torch.compile and offloading under a drop-in pipeline (tiny SD; CPU; a counting dynamo backend).

Rows of the compatibility matrix in ``docs/pipelines.md``.
"""

from __future__ import annotations

import pytest
import torch
from mmskip.diffusion import FeatureInheritanceConfig, StepSkipConfig
from mmskip.pipelines import SkipDiTPipeline, SkipStableDiffusionPipeline

from mmskip.schedules import interval

from ..diffusion._tiny import tiny_pipeline_components


def _pipe(kind="sd"):
    comps, kw = tiny_pipeline_components(kind)
    pipe = (SkipStableDiffusionPipeline if kind == "sd" else SkipDiTPipeline)(**comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe, kw


def _img(pipe, kw, **extra):
    return pipe(generator=torch.Generator().manual_seed(0), **dict(kw, **extra)).images


class _Counting:
    """A dynamo backend that runs the captured graph eagerly and counts compilations."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _hooks(module):
    return {n for m in module.modules() if getattr(m, "_diffusers_hook", None) for n in m._diffusers_hook.hooks}


@pytest.mark.parametrize("idiom", ["module.compile()", "torch.compile(module)"])
def test_compiled_denoiser_compiles_once_not_per_step(idiom):
    pipe, kw = _pipe()
    pipe.enable_skip(FeatureInheritanceConfig(interval(2)))
    eager = _img(pipe, kw)
    eager_stats = pipe.skip_stats()
    backend = _Counting()
    if idiom == "module.compile()":
        pipe.unet.compile(backend=backend)
    else:
        pipe.unet = torch.compile(pipe.unet, backend=backend)
    assert torch.equal(_img(pipe, kw), eager)
    first = backend.graphs
    # one graph per distinct situation (nothing cached yet / recompute / inherit), not per timestep
    assert 1 <= first <= 4, first
    stats = pipe.skip_stats()
    assert stats["recomputed_steps"] == [0, 2, 4]
    # per-target counts are kept in eager code, so the FLOPs accounting is the same under compile
    assert stats["items"] == eager_stats["items"] and stats["flops_fraction"] == eager_stats["flops_fraction"]
    assert torch.equal(_img(pipe, kw), eager)
    _img(pipe, kw, num_inference_steps=12)  # new timesteps, longer trajectory
    assert backend.graphs == first
    assert pipe.skip_stats()["recomputed_steps"] == [0, 2, 4, 6, 8, 10]
    pipe.disable_skip()
    plain = _img(pipe, kw)
    assert not torch.equal(plain, eager) and not _hooks(pipe.unet)


@pytest.mark.parametrize("regional", [False, True], ids=["whole-model", "compile_repeated_blocks"])
def test_usual_order_compile_enable_call_compiles_only_on_the_first_call(regional):
    """compile, then enable_skip, then call: the first call compiles every graph the settings need (the
    FLOPs-measuring first step included); later calls and other step counts reuse them."""
    ref_pipe, kw = _pipe()
    ref_pipe.enable_skip(FeatureInheritanceConfig(interval(2)))
    eager = _img(ref_pipe, kw)
    pipe, _ = _pipe()
    backend = _Counting()
    if regional:
        pipe.unet.compile_repeated_blocks(backend=backend)
    else:
        pipe.unet.compile(backend=backend)
    pipe.enable_skip(FeatureInheritanceConfig(interval(2)))
    assert torch.equal(_img(pipe, kw), eager)
    graphs = backend.graphs
    with torch.compiler.set_stance("fail_on_recompile"):
        assert torch.equal(_img(pipe, kw), eager)
        _img(pipe, kw, num_inference_steps=12)
    assert backend.graphs == graphs and pipe.skip_stats()["recomputed_steps"] == [0, 2, 4, 6, 8, 10]
    assert pipe.skip_stats()["flops_fraction"] == ref_pipe.skip_stats()["flops_fraction"]


@pytest.mark.parametrize("kind", ["sd", "dit"])  # UNet blocks (whole outputs) and a DiT block range (residual)
def test_a_new_prompt_reuses_the_compiled_graphs(kind):
    """The hooks read the call's cached features from a dict chosen in eager code, never by the
    conditioning's fingerprint, so no graph guards on it: another prompt / class compiles nothing."""
    pipe, kw = _pipe(kind)
    pipe.enable_skip(FeatureInheritanceConfig(interval(2)))
    other = dict(kw, prompt_embeds=kw["prompt_embeds"] + 1.0) if kind == "sd" else dict(kw, class_labels=[5, 7])
    eager = _img(pipe, other)
    backend = _Counting()
    pipe.transformer.compile(backend=backend) if kind == "dit" else pipe.unet.compile(backend=backend)
    _img(pipe, kw)
    graphs = backend.graphs
    with torch.compiler.set_stance("fail_on_recompile"):
        assert _same(_img(pipe, other), eager)
    assert backend.graphs == graphs


def _same(a, b):
    return torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def test_step_skipping_under_compile():
    pipe, kw = _pipe()
    pipe.enable_skip(StepSkipConfig(interval(2)))
    eager = _img(pipe, kw)
    backend = _Counting()
    pipe.unet.compile(backend=backend)
    assert torch.equal(_img(pipe, kw), eager)
    assert torch.equal(_img(pipe, kw), eager) and backend.graphs == 1


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading_composes_with_inheritance(offload_type):
    ref_pipe, kw = _pipe()
    ref_pipe.enable_skip(FeatureInheritanceConfig(interval(2)))
    ref = _img(ref_pipe, kw)
    pipe, _ = _pipe()
    extra = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    cpu = torch.device("cpu")
    pipe.unet.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type=offload_type, **extra)
    offload_hooks = _hooks(pipe.unet)
    assert offload_hooks
    pipe.enable_skip(FeatureInheritanceConfig(interval(2)))
    assert torch.equal(_img(pipe, kw), ref)
    assert pipe.skip_stats()["recomputed_steps"] == ref_pipe.skip_stats()["recomputed_steps"]
    assert pipe.skip_stats()["flops_fraction"] == pytest.approx(ref_pipe.skip_stats()["flops_fraction"])
    assert _hooks(pipe.unet) == offload_hooks  # mmskip removed only its own hooks
    pipe.disable_skip()
    ref_pipe.disable_skip()
    assert torch.equal(_img(pipe, kw), _img(ref_pipe, kw))


def test_model_cpu_offload_composes_with_inheritance():
    ref_pipe, kw = _pipe()
    ref_pipe.enable_skip(FeatureInheritanceConfig(interval(2)))
    ref = _img(ref_pipe, kw)
    pipe, _ = _pipe()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe.enable_model_cpu_offload(device=device)
    pipe.enable_skip(FeatureInheritanceConfig(interval(2)))
    out = _img(pipe, kw)
    assert pipe.skip_stats()["recomputed_steps"] == [0, 2, 4]
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="sequential CPU offload needs an accelerator "
                    "(on a CPU-only machine the plain diffusers pipeline fails too)")
def test_sequential_cpu_offload_composes_with_inheritance():
    ref_pipe, kw = _pipe()
    ref_pipe.enable_skip(FeatureInheritanceConfig(interval(2)))
    ref = _img(ref_pipe, kw)
    pipe, _ = _pipe()
    pipe.enable_sequential_cpu_offload()
    pipe.enable_skip(FeatureInheritanceConfig(interval(2)))
    torch.testing.assert_close(_img(pipe, kw).cpu(), ref, rtol=1e-3, atol=1e-3)
