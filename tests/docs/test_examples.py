"""Every ``python`` code block on the technique pages (and Getting started) runs as written, on the zoo.

Blocks of a page run in order in one namespace, in a temporary working directory, on one thread.
A block preceded by ``<!-- docs-test: skip (reason) -->`` is shown but not run (say why in the
comment). Examples use the zoo's smallest settings (few steps, one or two inputs), so a page runs
in seconds; a page that names a zoo model this installation lacks is skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from mmskip import zoo

DOCS = Path(__file__).resolve().parents[2] / "docs"
PAGES = sorted((DOCS / "techniques").glob("*.md")) + [DOCS / "getting-started.md"]
BLOCK = re.compile(r"(?P<skip><!-- docs-test: skip[^>]*-->\n)?```python\n(?P<code>.*?)```", re.S)
ZOO_NAME = re.compile(r"zoo\.(?:load|path)\(\"([\w-]+)\"\)")


def blocks(page: Path) -> list[str]:
    """The runnable ``python`` blocks of ``page``, in order (blocks marked skip left out)."""
    return [m["code"] for m in BLOCK.finditer(page.read_text()) if not m["skip"]]


def test_skip_marker_is_recognised():
    text = "<!-- docs-test: skip (needs a GPU) -->\n```python\nraise SystemExit\n```\n```python\nx = 1\n```\n"
    page = Path(__file__).with_name("_probe.md")
    try:
        page.write_text(text)
        assert blocks(page) == ["x = 1\n"]
    finally:
        page.unlink()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_page_examples_run(page: Path, tmp_path, monkeypatch):
    code = blocks(page)
    assert code, f"{page.name} has no runnable python block"
    missing = sorted(set(ZOO_NAME.findall(page.read_text())) - set(zoo.available()))
    if missing:
        pytest.skip(f"zoo models not in this installation: {missing}")
    monkeypatch.chdir(tmp_path)  # examples may write files (saved configs, stats, routers)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    scope: dict = {"__name__": f"docs.{page.stem}"}
    try:
        for i, block in enumerate(code):
            exec(compile(block, f"{page.relative_to(DOCS.parent)} (block {i + 1})", "exec"), scope)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("page", sorted(DOCS.rglob("*.md")), ids=lambda p: str(p.relative_to(DOCS)))
def test_code_fences_are_closed(page: Path):
    """An unclosed fence turns the rest of a page into one code block, which a strict build accepts."""
    fences = [line for line in page.read_text().splitlines() if line.lstrip().startswith("```")]
    assert len(fences) % 2 == 0, f"{page.name}: an odd number of ``` fences"
