"""MkDocs hooks for mmskip's docs site (declared under ``hooks:`` in ``mkdocs.yml``).

* The ``mmskip`` package is installed from four folders (``mmskip/``, ``vision/``, ``diffusion/``,
  ``pipelines/``; setuptools ``package-dir`` in ``pyproject.toml``). mkdocstrings reads the source
  statically (griffe), which finds a package in one folder only, so before the build this hook lays
  the package out as it is installed (a temporary ``mmskip/`` of links to every entry of
  ``mmskip/`` plus the three wings) and points mkdocstrings' Python handler at it.
* The figures stay where the benchmarks write them (``benchmarks/results/**/*.png``, served as
  ``results/...png``), and each zoo model card (``mmskip/zoo/models/NAME/README.md``) is served
  as the page ``zoo/NAME.md``: nothing is copied into ``docs/``.
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # the docs extra's `build` brings tomli on Python 3.10
    import tomli as tomllib

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]

def package_dirs() -> dict[str, str]:
    """``mmskip``'s subpackages that live in their own folder: pyproject.toml's package-dir, e.g.
    ``{"vision": "vision", "diffusion": "diffusion", "pipelines": "pipelines"}``."""
    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {name.removeprefix("mmskip."): folder for name, folder in dirs.items() if name.startswith("mmskip.")}

RESULTS = ROOT / "benchmarks" / "results"
CARDS = ROOT / "mmskip" / "zoo" / "models"
# per-run scratch folders under benchmarks/results (git-ignored trial logs), not figures to serve
RUN_FOLDERS = {"tune_runs", "tune_smoke_runs"}


def installed_layout(dest: Path) -> Path:
    """Build ``dest/mmskip`` as the installed package (links into the repository); returns ``dest``."""
    pkg = dest / "mmskip"
    pkg.mkdir(parents=True)
    wings = package_dirs()
    for entry in (ROOT / "mmskip").iterdir():
        if entry.name not in wings and entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    for name, folder in wings.items():
        (pkg / name).symlink_to(ROOT / folder)
    return dest


@event_priority(100)  # before mkdocstrings' on_config, which creates the Python handler
def on_config(config: MkDocsConfig) -> MkDocsConfig:
    """Point mkdocstrings at a temporary copy of the installed layout (links, removed at exit)."""
    src = Path(tempfile.mkdtemp(prefix="mmskip-api-src-"))
    atexit.register(shutil.rmtree, src, ignore_errors=True)
    installed_layout(src)
    handlers = config.plugins["mkdocstrings"].config["handlers"]
    handlers.setdefault("python", {})["paths"] = [str(src)]
    return config


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Serve the benchmark figures and the zoo's model cards from where they live."""
    for png in sorted(RESULTS.rglob("*.png")):
        if png.relative_to(RESULTS).parts[0] in RUN_FOLDERS:
            continue
        files.append(File(png.relative_to(RESULTS.parent).as_posix(), src_dir=str(RESULTS.parent),
                          dest_dir=config.site_dir, use_directory_urls=config.use_directory_urls))
    files.append(File("app_screenshot.png", src_dir=str(ROOT / "apps"), dest_dir=config.site_dir,
                      use_directory_urls=config.use_directory_urls))
    for card in sorted(CARDS.glob("*/README.md")):
        files.append(File.generated(config, f"zoo/{card.parent.name}.md", abs_src_path=str(card)))
    return files
