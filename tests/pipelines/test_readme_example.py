"""The pipelines page's example (docs/pipelines.md, moved there from the diffusion README) runs as
written, on the zoo's digits-sd pipeline."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mmskip import zoo

README = Path(__file__).resolve().parents[2] / "docs" / "pipelines.md"


@pytest.mark.skipif("digits-sd" not in zoo.available(), reason="zoo model digits-sd not trained")
def test_readme_example_runs_as_written(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)  # the example writes its stats file and a saved pipeline here
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    pipe = scope["pipe"]
    assert not pipe.skip_enabled
    assert (tmp_path / "digits-sd-fast" / "mmskip_skip_config.json").is_file()
    assert (tmp_path / "digits-sd-latents.safetensors").is_file()
