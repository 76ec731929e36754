"""What an LLM-only user imports: configs cost no hook machinery, applying costs only the hook machinery.

Each check runs in a fresh interpreter (``sys.modules`` of the test process is shared with every
other test). Behaviour, not timing: which modules get imported.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_LLAMA = """
from transformers import LlamaConfig, LlamaForCausalLM
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=2))
before = set(sys.modules)
"""

_APPLY = """
import json, sys
import torch, transformers
import mmskip
from mmskip import schedules
configs = [mmskip.LayerSkipConfig(schedule=schedules.unified(2.0)), mmskip.FFNSkipConfig(), mmskip.VoidLayerConfig(),
           mmskip.RouterConfig(path="routers"), mmskip.SelfSpeculativeConfig()]
assert all(mmskip.SkipConfig.from_dict(c.to_json()) == c for c in configs)
heavy = [m for m in ("diffusers", "diffusers.hooks.first_block_cache", "peft", "sympy", "torch._dynamo")
         if m in sys.modules]
""" + _LLAMA + """
handle = mmskip.apply(model, mmskip.LayerSkipConfig())
print(json.dumps({"heavy": heavy, "added": sorted(set(sys.modules) - before)}))
"""

_HOOKS = "import json, sys\nimport torch, transformers\n" + _LLAMA + """
import diffusers.hooks
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def _run(code: str) -> object:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # two fresh interpreters that import torch and transformers
def test_configs_import_no_hook_machinery_and_apply_only_the_hook_machinery():
    result = _run(_APPLY)
    # making, saving and loading every language config: no diffusers (hence no dynamo, sympy, peft)
    assert result["heavy"] == []
    added = set(result["added"])
    # applying LayerSkipConfig to a Llama imports diffusers' hook machinery and mmskip's core, nothing else
    hooks = set(_run(_HOOKS))
    assert {m for m in added if not m.startswith("mmskip")} <= hooks
    wings = ("mmskip.vision", "mmskip.diffusion", "mmskip.pipelines", "mmskip.train", "mmskip.zoo", "mmskip.eval",
             "mmskip.analysis", "mmskip.swift.generate")
    assert not [m for m in added if m.startswith(wings)]
