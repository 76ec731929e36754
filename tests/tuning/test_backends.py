"""mmskip.tune's backends: rounds of trials measured locally or on Ray actors find the same search."""

import json

import pytest
import torch

import mmskip
from mmskip.tuning import TuneError
from mmskip.tuning.trial_log import LOG_NAME

from ..conftest import tiny_lm

G = torch.Generator().manual_seed(1)
PROMPTS = [torch.randint(3, 128, (12,), generator=G) for _ in range(4)]
FAST = dict(max_new_tokens=4, repeats=3, finalists=2, progress=False, floor=0.0)


def _search(folder):
    """The logged calibration records, without wall time (the one field that may differ)."""
    rows = [json.loads(line) for line in (folder / LOG_NAME).read_text().splitlines()[1:]]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_rounds_of_two_measure_the_same_trials_as_asked_and_logged(tmp_path):
    model = tiny_lm("llama", layers=4)
    r = mmskip.tune(model, PROMPTS[:2], held_out=PROMPTS[2:], budget=5, out=tmp_path, workers=2, **FAST)
    assert r.trials == 5 and r.info["workers"] == 2 and r.info["backend"] == "local"
    trials = [row for row in _search(tmp_path) if row["kind"] == "trial"]
    assert len(trials) == 5 and all("params" in t for t in trials)


@pytest.mark.slow
@pytest.mark.timeout(900)  # starting a local Ray cluster takes ~20 s on an idle 2-core machine, minutes on a loaded one
def test_ray_backend_finds_exactly_the_local_search(tmp_path):
    ray = pytest.importorskip("ray")
    model = tiny_lm("llama", layers=4)
    local = mmskip.tune(model, PROMPTS[:2], held_out=PROMPTS[2:], budget=6, out=tmp_path / "local", workers=2, **FAST)
    distributed = mmskip.tune(model, PROMPTS[:2], held_out=PROMPTS[2:], budget=6, out=tmp_path / "ray",
                              backend="ray", workers=2, **FAST)
    assert not ray.is_initialized()  # the cluster tune started is shut down again
    assert _search(tmp_path / "ray") == _search(tmp_path / "local")
    assert [m.candidate.key for m in distributed.measured] == [m.candidate.key for m in local.measured]
    assert [m.quality for m in distributed.measured] == [m.quality for m in local.measured]
    assert distributed.info["backend"] == "ray"


@pytest.mark.parametrize("kwargs, needle", [
    (dict(backend="spark"), "backend must be one of"),
    (dict(workers=0), "workers must be a positive int"),
    (dict(ray_address="auto"), "ray_address is for backend='ray'"),
])
def test_bad_backend_settings_are_refused_with_what_to_do(kwargs, needle):
    with pytest.raises(TuneError, match=needle):
        mmskip.tune(tiny_lm("llama", layers=2), PROMPTS[:2], held_out=PROMPTS[2:], budget=2, **FAST, **kwargs)


def test_ray_backend_without_ray_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"mmskip\[ray\]"):
        mmskip.tune(tiny_lm("llama", layers=2), PROMPTS[:2], held_out=PROMPTS[2:], budget=2, backend="ray", **FAST)
