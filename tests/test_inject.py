import pytest
import torch

import mmskip
from mmskip import schedules


def test_remove_restores_exact_logits_and_module_state(llama, padded_batch):
    ids, mask = padded_batch
    layer = llama.model.layers[3]
    before_dict = set(layer.__dict__)
    with torch.no_grad():
        ref = llama(input_ids=ids, attention_mask=mask).logits
        handle = mmskip.apply(llama, mmskip.LayerSkipConfig(schedule=schedules.unified(2.0), phase="all"))
        changed = llama(input_ids=ids, attention_mask=mask).logits
        handle.remove()
        after = llama(input_ids=ids, attention_mask=mask).logits
    assert not torch.equal(ref, changed)
    assert torch.equal(ref, after)
    assert set(layer.__dict__) == before_dict
    assert not hasattr(llama, "_mmskip_handle")


def test_applied_context_manager_removes(llama, padded_batch):
    ids, mask = padded_batch
    with torch.no_grad():
        ref = llama(input_ids=ids, attention_mask=mask).logits
        with mmskip.applied(llama, mmskip.LayerSkipConfig(schedule=schedules.explicit(skip=[2]), phase="all")) as h:
            assert not h.removed
        assert h.removed
        assert torch.equal(ref, llama(input_ids=ids, attention_mask=mask).logits)


def test_apply_twice_and_remove_twice_raise(llama):
    h = mmskip.apply(llama, mmskip.LayerSkipConfig())
    with pytest.raises(RuntimeError, match="already has 'layer_skip' applied"):
        mmskip.apply(llama, mmskip.FFNSkipConfig())
    h.remove()
    with pytest.raises(RuntimeError, match="already removed"):
        h.remove()
    mmskip.apply(llama, mmskip.FFNSkipConfig()).remove()  # applying again after removal works


def test_unsupported_model_names_class_and_families():
    with pytest.raises(mmskip.UnsupportedModelError, match=r"Linear.*LlamaForCausalLM"):
        mmskip.apply(torch.nn.Linear(2, 2), mmskip.LayerSkipConfig())


def test_failed_apply_leaves_model_untouched(llama):
    with pytest.raises(ValueError, match="skips every layer"):
        mmskip.apply(llama, mmskip.LayerSkipConfig(schedule=schedules.explicit(skip=list(range(8)))))
    assert not hasattr(llama.model, "_diffusers_hook")
    assert not hasattr(llama, "_mmskip_handle")


def test_apply_rejects_non_config(llama):
    with pytest.raises(TypeError, match="mmskip config"):
        mmskip.apply(llama, {"schedule": "unified"})


@pytest.mark.parametrize(
    "config",
    [
        mmskip.LayerSkipConfig(schedule=schedules.unified(3.0), phase="all"),
        mmskip.FFNSkipConfig(schedule=schedules.adaptive(0.9, warmup=2, max_skip=0.3), cold=(1, 1), span=1),
        mmskip.VoidLayerConfig(schedule=schedules.adaptive(0.6, "l2_change", max_skip=0.25), min_void_fraction=0.7),
    ],
)
def test_config_json_round_trip(config):
    assert mmskip.SkipConfig.from_dict(config.to_json()) == config


def test_config_json_names_its_module_and_only_mmskip_modules_are_imported():
    d = mmskip.LayerSkipConfig().to_dict()
    assert d["module"] == "mmskip.layer_skip"
    with pytest.raises(ValueError, match="unknown technique 'nope'"):
        mmskip.SkipConfig.from_dict({"technique": "nope", "module": "antigravity"})
    import sys

    assert "antigravity" not in sys.modules


def test_one_technique_per_model_across_submodules(llama, padded_batch):
    ids, mask = padded_batch
    with torch.no_grad():
        ref = llama(input_ids=ids, attention_mask=mask).logits
    h = mmskip.apply(llama, mmskip.LayerSkipConfig(schedule=schedules.unified(2.0), phase="all"))
    with pytest.raises(RuntimeError, match="already has mmskip technique 'layer_skip' applied"):
        mmskip.apply(llama.model, mmskip.FFNSkipConfig())  # a submodule of a model with a technique
    h.remove()
    inner = mmskip.apply(llama.model, mmskip.FFNSkipConfig())
    with pytest.raises(RuntimeError, match="already has mmskip technique 'ffn_skip' applied on model"):
        mmskip.apply(llama, mmskip.LayerSkipConfig())  # a model containing a module with a technique
    inner.remove()
    with torch.no_grad():
        assert torch.equal(ref, llama(input_ids=ids, attention_mask=mask).logits)
    assert not any(hasattr(m, "_diffusers_hook") for m in llama.modules())


def test_applied_lets_the_users_exception_through(llama):
    with pytest.raises(KeyError, match="mine"):
        with mmskip.applied(llama, mmskip.LayerSkipConfig()) as h:
            h.remove()
            raise KeyError("mine")
    assert h.removed and not hasattr(llama, "_mmskip_handle")


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (None, TypeError, "takes a dict or JSON object"),
        ("abc", ValueError, "not valid JSON"),
        ("[1, 2]", TypeError, "got list"),
        (3, TypeError, "got int"),
        ({"technique": "layer_skip", "phase": 1}, TypeError, "phase must be a str"),
        ({"technique": "layer_skip", "speed": 2}, ValueError, r"no field\(s\) \['speed'\]"),
        ({"technique": "self_speculative", "reuse": "no"}, TypeError, r"reuse must be a bool"),
        ({"technique": "self_speculative", "seed": 1.5}, TypeError, "seed must be an int"),
        ({"technique": "ffn_skip", "span": True}, TypeError, "span must be an int"),
    ],
)
def test_from_dict_rejects_bad_input_clearly(bad, error, match):
    with pytest.raises(error, match=match):
        mmskip.SkipConfig.from_dict(bad)


def test_schedules_reject_bools_and_wrong_types():
    with pytest.raises(TypeError, match=r"interval\(\): every must be an int"):
        schedules.interval(True)
    with pytest.raises(TypeError, match=r"explicit\(\): skip_idx must be a tuple/list of int"):
        schedules.explicit(skip=[True])
    with pytest.raises(TypeError, match=r"unified\(\): speedup must be a number"):
        schedules.unified("2")
    assert schedules.explicit(skip=[1, 2]) == schedules.explicit(skip=(1, 2))  # lists are stored as tuples


def test_save_pretrained_round_trip(tmp_path):
    config = mmskip.FFNSkipConfig(schedule=schedules.adaptive(0.9, warmup=2, max_skip=0.3), cold=(1, 1), span=1)
    path = config.save_pretrained(tmp_path / "cfg")
    assert path.name == "mmskip_config.json"
    assert mmskip.SkipConfig.from_pretrained(tmp_path / "cfg") == config
    assert mmskip.FFNSkipConfig.from_pretrained(path) == config
    with pytest.raises(TypeError, match="holds a FFNSkipConfig, not a LayerSkipConfig"):
        mmskip.LayerSkipConfig.from_pretrained(tmp_path / "cfg")
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        mmskip.SkipConfig.from_pretrained(tmp_path / "nothing")


def _registered_configs() -> dict:
    import mmskip.diffusion  # (registers the diffusion techniques)
    import mmskip.diffusion.assembly  # noqa: F401  (AssemblyBypassConfig)
    import mmskip.diffusion.relactrl  # noqa: F401  (ControlSkipConfig)
    import mmskip.vision  # noqa: F401  (p-MoD, VideoLLM-MoD, MuE)

    mmskip.SkipConfig  # noqa: B018  (the package's first API access registers the language techniques)

    from mmskip.inject import _CONFIGS

    return dict(_CONFIGS)


_NO_PAPER = {"step_skip"}  # fewer sampler steps: no paper to cite


@pytest.mark.parametrize("technique", sorted(_registered_configs()))
def test_every_config_documents_its_fields_and_paper(technique):
    import dataclasses

    cls = _registered_configs()[technique]
    doc = cls.__doc__ or ""
    assert "Args:" in doc, f"{cls.__name__} docstring has no Args: section"
    args = doc.split("Args:", 1)[1]
    missing = [f.name for f in dataclasses.fields(cls) if f"{f.name}:" not in args]
    assert not missing, f"{cls.__name__} docstring does not document {missing}"
    if technique not in _NO_PAPER:
        assert "arxiv.org/abs/" in doc, f"{cls.__name__} docstring has no arXiv link"


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mmskip.nope  # noqa: B018


@pytest.mark.parametrize("bad, match", [
    ("stdlib-lm", "load the model first"),
    ((torch.nn.Linear(2, 2), "tokenizer"), r"\(model, tokenizer\): unpack it first"),
    (42, "pass the torch.nn.Module itself"),
])
def test_apply_on_a_non_module_says_what_to_pass(bad, match):
    with pytest.raises(TypeError, match=match):
        mmskip.apply(bad, mmskip.LayerSkipConfig())


def test_apply_on_a_diffusers_pipeline_points_to_the_denoiser_or_the_drop_in():
    from diffusers import DDIMScheduler, DiffusionPipeline

    class Pipe(DiffusionPipeline):
        def __init__(self, unet, scheduler):
            super().__init__()
            self.register_modules(unet=unet, scheduler=scheduler)

    pipe = Pipe(torch.nn.Linear(2, 2), DDIMScheduler())
    with pytest.raises(TypeError, match=r"pipe\.unet.*drop-in pipeline"):
        mmskip.apply(pipe, mmskip.LayerSkipConfig())


DEEPCOPY_CONFIGS = [
    mmskip.LayerSkipConfig(schedule=schedules.unified(2.0), phase="all"),
    mmskip.FFNSkipConfig(schedule=schedules.adaptive(0.0, warmup=0, max_skip=0.5), cold=(1, 1)),
    mmskip.VoidLayerConfig(),
]


@pytest.mark.parametrize("config", DEEPCOPY_CONFIGS, ids=lambda c: c.technique)
def test_deepcopy_while_applied_gives_an_independent_copy_with_the_technique(llama, config):
    import copy

    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        ref = llama.generate(ids, **kw)
        handle = mmskip.apply(llama, config)
        want = llama.generate(ids, **kw)
        clone = copy.deepcopy(llama)
        assert torch.equal(llama.generate(ids, **kw), want)  # the original still runs its technique
        assert torch.equal(clone.generate(ids, **kw), want)  # and so does the copy
        assert clone._mmskip_handle is not handle and clone._mmskip_handle.config == config
        for p in llama.parameters():  # the copy shares no weights and no hooks with the original
            p.data.zero_()
        assert torch.equal(clone.generate(ids, **kw), want)
        clone._mmskip_handle.remove()
        assert torch.equal(clone.generate(ids, **kw), ref)
        assert "__deepcopy__" not in clone.__dict__
        handle.remove()
        assert "__deepcopy__" not in llama.__dict__


def test_configs_saved_under_the_old_module_names_still_load():
    """Saved configs name the module that defined them; the LLM techniques moved into one folder
    each (``mmskip.speculative`` -> ``mmskip.swift``, ``mmskip.routers`` -> ``mmskip.first_routers``).
    A fresh interpreter, so the technique registers only through the saved module name."""
    import json
    import subprocess
    import sys

    saved = [
        {"technique": "self_speculative", "module": "mmskip.speculative.config", "max_draft": 4},
        {"technique": "self_speculative", "module": "mmskip.speculative", "max_draft": 4},
        {"technique": "first_routers", "module": "mmskip.routers", "path": "r", "threshold": 0.4},
        {"technique": "layer_skip", "module": "mmskip.layer_skip", "phase": "all"},
        {"technique": "ffn_skip", "module": "mmskip.ffn_skip", "span": 3},
        {"technique": "void_layers", "module": "mmskip.void_layers", "lift_layers": 2},
    ]
    code = (
        "import json, sys\nfrom mmskip.inject import SkipConfig\n"
        f"saved = json.loads({json.dumps(json.dumps(saved))})\n"
        "print(json.dumps([[type(c).__name__, c.to_dict()['module']] for c in map(SkipConfig.from_dict, saved)]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [
        ["SelfSpeculativeConfig", "mmskip.swift"],
        ["SelfSpeculativeConfig", "mmskip.swift"],
        ["RouterConfig", "mmskip.first_routers"],
        ["LayerSkipConfig", "mmskip.layer_skip"],
        ["FFNSkipConfig", "mmskip.ffn_skip"],
        ["VoidLayerConfig", "mmskip.void_layers"],
    ]


def test_pickling_an_applied_model_says_what_to_do_instead(llama):
    import copy
    import io
    import pickle

    handle = mmskip.apply(llama, mmskip.LayerSkipConfig(schedule=schedules.unified(2.0)))
    for attempt in (lambda: torch.save(llama, io.BytesIO()), lambda: pickle.dumps(llama), lambda: copy.copy(llama)):
        with pytest.raises(TypeError, match=r"state_dict\(\).*apply the config again.*copy\.deepcopy"):
            attempt()
    handle.remove()
    assert "__reduce_ex__" not in llama.__dict__
    torch.save(llama, io.BytesIO())  # the unmodified model pickles as before
