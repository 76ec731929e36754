"""The docs site builds with ``mkdocs build --strict`` (no broken link, anchor or API object), and its
API reference documents every public name of ``mmskip`` and of the wings."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocstrings", reason="the docs extra is not installed: pip install -e '.[docs]'")

ROOT = Path(__file__).resolve().parents[2]
# modules whose __all__ the API reference must cover: the core and the wings (and the core's public packages)
MODULES = ("mmskip", "mmskip.diffusion", "mmskip.vision", "mmskip.pipelines", "mmskip.schedules", "mmskip.train",
           "mmskip.tuning", "mmskip.zoo", "mmskip.eval", "mmskip.analysis", "mmskip.timing", "mmskip.registry")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stderr[-4000:]}"
    return out


def documented(site: Path) -> set[str]:
    """Every identifier the API reference rendered (mkdocstrings' inventory)."""
    from mkdocstrings import Inventory

    with open(site / "objects.inv", "rb") as f:
        return set(Inventory.parse_sphinx(f))


def public_names(module: str) -> list[str]:
    """``module.__all__`` as dotted names, leaving out submodules (they are pages of their own)."""
    mod = importlib.import_module(module)
    names = []
    for name in mod.__all__:
        if isinstance(getattr(mod, name), type(mod)):
            assert f"{module}.{name}" in MODULES, f"{module}.{name} is a public module without an API page"
            continue
        names.append(f"{module}.{name}")
    return names


def defined_at(dotted: str) -> str | None:
    """Where a re-exported function or class is defined (``mmskip.tune`` -> ``mmskip.tuning.tune.tune``):
    a function named like its module is documented there, since the module shadows it."""
    module, _, name = dotted.rpartition(".")
    obj = getattr(importlib.import_module(module), name)
    where = getattr(obj, "__module__", None)
    return f"{where}.{obj.__qualname__}" if where and hasattr(obj, "__qualname__") else None


def test_build_is_strict_clean(site):
    assert (site / "index.html").is_file() and (site / "api" / "core" / "index.html").is_file()
    assert (site / "results" / "diffusion_pareto.png").is_file()  # figures served from benchmarks/results


def test_api_reference_covers_every_public_name(site):
    have = documented(site)
    want = [n for m in MODULES for n in public_names(m)]
    missing = [n for n in want if n not in have and defined_at(n) not in have]
    assert not missing, f"not in the API reference (add them to docs/api/): {missing}"
    assert len(want) > 150


POINTERS = ("README.md", "diffusion/README.md", "vision/README.md", "vision/mue/README.md")
LINK = re.compile(r"\]\((?!https?://)([^)#\s]+)(?:#([^)\s]+))?\)")


def test_readme_links_reach_the_docs(site):
    """The READMEs point into docs/: every relative link names a file that exists, and every anchor
    into a docs page is an id on the built page (one test: the site is built once per process)."""
    for readme in POINTERS:
        check_links(site, readme)


def check_links(site: Path, readme: str) -> None:
    source = ROOT / readme
    links = LINK.findall(source.read_text())
    assert links, f"{readme} links nowhere"
    for target, anchor in links:
        path = (source.parent / target).resolve()
        assert path.exists(), f"{readme} links to {target}, which does not exist"
        if anchor and path.suffix == ".md" and (ROOT / "docs") in path.parents:
            page = path.relative_to(ROOT / "docs").with_suffix("")
            html = site / (page.parent if page.name == "index" else page) / "index.html"
            assert f'id="{anchor}"' in html.read_text(), f"{readme} links to {target}#{anchor}: no such anchor"


def test_docs_hook_lays_out_the_installed_package(tmp_path):
    """docs/_hooks.py rebuilds the installed layout for mkdocstrings from pyproject.toml's package-dir:
    every wing folder appears as a subpackage of mmskip."""
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        hooks = importlib.import_module("_hooks")
    finally:
        sys.path.remove(str(ROOT / "docs"))
    assert {"vision", "diffusion", "pipelines"} <= set(hooks.package_dirs())
    pkg = hooks.installed_layout(tmp_path) / "mmskip"
    for name, folder in hooks.package_dirs().items():
        assert (pkg / name / "__init__.py").resolve() == (ROOT / folder / "__init__.py").resolve()
    assert (pkg / "__init__.py").resolve() == (ROOT / "mmskip" / "__init__.py").resolve()
