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


def test_a_wing_model_names_the_wing_to_import_until_the_wing_registers_its_loader():
    probe = ("import sys\nfrom mmskip import zoo\n"
             "try:\n    zoo.load('scenes-flux-relactrl')\nexcept zoo.LoaderNotRegisteredError as e:\n    print(e)\n"
             "print('mmskip.diffusion' in sys.modules)\n"
             "import mmskip.diffusion\nfrom mmskip.zoo.loaders import LOADERS\n"
             "print(sorted(n for n in zoo.WINGS if n in LOADERS) == sorted(zoo.WINGS))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=240, check=True)
    said, imported, registered = out.stdout.strip().splitlines()[-3:]
    assert "`import mmskip.diffusion` first" in said and "scenes-flux-relactrl" in said
    assert imported == "False" and registered == "True"


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
