"""The zoo imports no wing and no recipe: wings register their loaders, recipes live in recipes/."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from mmskip import zoo

REPO = Path(__file__).resolve().parents[2]
INSTALLED = ("mmskip", "vision", "diffusion", "pipelines")


def test_a_wing_model_loads_through_the_wing_declared_in_the_package_metadata():
    """zoo.load imports no wing by name: the diffusion wing, declared under the ``mmskip.wings``
    entry points, is imported by mmskip.wings.load_wings and registers the loader."""
    probe = ("import sys\nfrom mmskip import zoo\n"
             "print('mmskip.diffusion' in sys.modules)\n"
             "pipe = zoo.load('scenes-flux-relactrl')\n"
             "print(type(pipe).__name__, 'mmskip.diffusion' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=240, check=True)
    before, after = out.stdout.strip().splitlines()[-2:]
    assert before == "False" and after == "FluxControlNetPipeline True"


def test_a_wing_model_whose_wing_is_not_installed_names_the_wing(monkeypatch):
    import mmskip.wings
    from mmskip.zoo.loaders import LOADERS

    monkeypatch.delitem(LOADERS, "scenes-flux-relactrl", raising=False)
    monkeypatch.setattr(mmskip.wings, "entry_points", lambda group: [])
    mmskip.wings.load_wings.cache_clear()
    try:
        with pytest.raises(zoo.LoaderNotRegisteredError, match=r"`import mmskip.diffusion` first"):
            zoo.load("scenes-flux-relactrl")
    finally:
        mmskip.wings.load_wings.cache_clear()


def test_wings_are_declared_entry_points():
    from importlib.metadata import entry_points

    declared = {ep.name: ep.value for ep in entry_points(group="mmskip.wings")}
    assert declared == {"vision": "mmskip.vision", "diffusion": "mmskip.diffusion"}


def test_register_loader_refuses_names_outside_the_zoo():
    with pytest.raises(zoo.UnknownModelError):
        zoo.register_loader("nope", lambda folder, **kw: None)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_no_recipe_in_the_installed_package_and_no_installed_module_imports_one():
    files = [p for top in INSTALLED for p in (REPO / top).rglob("*.py")]
    assert not [p for p in files if p.name.startswith("train_") and "zoo" in p.parts]
    assert not (REPO / "mmskip" / "zoo" / "train.py").exists()
    bad = {str(p.relative_to(REPO)): sorted(m for m in _imports(p) if m.split(".")[0] in ("recipes", "mmskip_recipes"))
           for p in files}
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_zoo_and_eval_import_no_wing():
    wings = ("mmskip.vision", "mmskip.diffusion", "mmskip.pipelines", "mmskip.train")
    files = list((REPO / "mmskip" / "zoo").glob("*.py")) + list((REPO / "mmskip" / "eval").glob("*.py"))
    bad = {p.name: sorted(m for m in _imports(p) if m.startswith(wings)) for p in files if p.name != "__main__.py"}
    assert {k: v for k, v in bad.items() if v} == {}
