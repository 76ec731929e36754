"""Every config's declared search space builds valid configs across its ranges (no per-technique code)."""

import pytest

from mmskip.inject import SkipConfig
from mmskip.tuning import Choice, FloatRange, IntRange, TuneContext
from mmskip.wings import load_techniques

from ..conftest import tiny_lm


def _corners(param):
    if isinstance(param, Choice):
        return list(param.values)
    if isinstance(param, IntRange):
        return [param.low, param.high]
    assert isinstance(param, FloatRange)
    return [param.low, (param.low + param.high) / 2, param.high]


load_techniques()
LM_CONTEXT = TuneContext(tiny_lm("llama", layers=6), "lm", num_layers=6)
LM_SPACES = [c.search_space(LM_CONTEXT) for c in SkipConfig.registered()]


def test_the_language_techniques_declare_spaces():
    names = {s.technique for s in LM_SPACES if s is not None}
    assert {"layer_skip", "ffn_skip", "void_layers", "self_speculative"} <= names


@pytest.mark.parametrize("space", [s for s in LM_SPACES if s is not None], ids=lambda s: s.technique)
def test_every_corner_of_a_space_builds_its_config(space):
    import itertools

    names = list(space.params)
    for values in itertools.product(*(_corners(space.params[n]) for n in names)):
        config = space.build(dict(zip(names, values)))
        assert isinstance(config, SkipConfig) and config.technique == space.technique
        assert SkipConfig.from_dict(config.to_dict()) == config


def test_spaces_are_not_offered_to_models_they_do_not_fit():
    too_shallow = TuneContext(tiny_lm("llama", layers=2), "lm", num_layers=2)
    assert all(c.search_space(too_shallow) is None for c in SkipConfig.registered()
               if c.technique in ("layer_skip", "ffn_skip", "self_speculative"))
