"""The README's first example runs as written, on the zoo's stdlib-lm."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from mmskip import zoo

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.skipif("stdlib-lm" not in zoo.available(), reason="zoo model stdlib-lm not trained")
def test_readme_example_runs_as_written(capsys):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    model, tok = zoo.load("stdlib-lm")
    inputs = dict(tok("def main(argv):\n    ", return_tensors="pt"), max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        ref = model(input_ids=inputs["input_ids"]).logits
    scope = {"model": model, "inputs": inputs}
    exec(compile(code, str(README), "exec"), scope)
    printed = capsys.readouterr().out
    assert "'technique': 'layer_skip'" in printed and "'skipped_layers': [" in printed
    assert scope["out"].shape == (1, inputs["input_ids"].shape[1] + 8)
    with torch.no_grad():
        assert torch.equal(ref, model(input_ids=inputs["input_ids"]).logits)
    assert not any(hasattr(m, "_diffusers_hook") for m in model.modules())
