"""``pip install mmskip`` is lean: the core packages import none of the optional extras' modules,
and a feature whose extra is missing says which extra to install."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

OPTIONAL = ["torchmetrics", "open_clip", "sklearn", "matplotlib"]


@pytest.fixture(scope="module")
def loaded() -> dict[str, list[str]]:
    """Optional modules in ``sys.modules`` of a fresh interpreter after the core imports, then after
    importing the eval and analysis packages (one subprocess: importing torch & co. takes seconds)."""
    probe = f"""import sys, json
seen = lambda: sorted(m for m in {OPTIONAL!r} if m in sys.modules)
import mmskip
lazy = sorted(m for m in ("mmskip.zoo", "mmskip.diffusion", "mmskip.pipelines", "mmskip.eval", "mmskip.analysis")
              if m in sys.modules)
attrs = [mmskip.zoo.NAMES[0], mmskip.diffusion.__name__, mmskip.pipelines.__name__, "zoo" in dir(mmskip)]
import mmskip.zoo, mmskip.diffusion, mmskip.pipelines
core = seen()
import mmskip.eval, mmskip.eval.images, mmskip.eval.lm, mmskip.analysis, mmskip.analysis.cli, mmskip.zoo.loaders
print(json.dumps({{"core": core, "eval_analysis": seen(), "lazy": lazy, "attrs": attrs}}))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=240, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_mmskip_loads_subpackages_lazily_as_attributes(loaded):
    assert loaded["lazy"] == []
    assert loaded["attrs"] == ["digits-classifier", "mmskip.diffusion", "mmskip.pipelines", True]


def test_core_imports_pull_in_no_optional_dependency(loaded):
    assert loaded["core"] == []


def test_eval_and_analysis_import_their_extras_only_when_used(loaded):
    assert loaded["eval_analysis"] == []


@pytest.mark.parametrize(("blocked", "call", "extra"), [
    ("torchmetrics.functional.image", "psnr", "eval"),
    ("torchmetrics.image.fid", "make_fid", "eval"),
    ("open_clip", "load_clip", "eval"),
])
def test_a_missing_extra_names_what_to_install(monkeypatch, blocked, call, extra):
    import torch

    import mmskip.eval as ev

    monkeypatch.setitem(sys.modules, blocked, None)  # as if the package were not installed
    args = {"psnr": (torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)), "make_fid": (torch.nn.Identity(),),
            "load_clip": ("ViT-B-32:none",)}[call]
    with pytest.raises(ImportError, match=rf"pip install 'mmskip\[{extra}\]'"):
        getattr(ev, call)(*args)


def test_plot_without_matplotlib_names_the_analysis_extra(monkeypatch, tmp_path):
    from mmskip.analysis.depth import DepthReport

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    report = DepthReport(model="m", num_layers=1, tokens=1, contributions={}, skip_effect={}, voids={}, curve=[],
                         min_agreement=0.9, suggested_skip=[])
    with pytest.raises(ImportError, match=r"pip install 'mmskip\[analysis\]'"):
        report.plot(tmp_path)


def test_core_submodules_are_attributes_after_import_mmskip():
    """``import mmskip`` is lazy, yet ``mmskip.registry`` / ``mmskip.timing`` / ``mmskip.inject`` work
    as attributes, as they did when the package imported them eagerly."""
    import subprocess
    import sys

    code = ("import mmskip; assert callable(mmskip.registry.get_adapter); assert callable(mmskip.timing.paired); "
            "assert mmskip.inject.apply is mmskip.apply")
    subprocess.run([sys.executable, "-c", code], check=True)
