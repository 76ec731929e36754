"""Smoke test of an installed mmskip wheel (run by .ci/run in a clean virtual environment).

Imports mmskip, applies and removes a layer skip on a tiny random Llama built from its config, and
checks that the outputs change while applied and are restored exactly after ``remove()``. Needs
nothing but the wheel and its dependencies: no repository files, no zoo weights.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mmskip


def main() -> None:
    assert mmskip.__file__ and "site-packages" in mmskip.__file__, f"mmskip imported from {mmskip.__file__}"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)).eval()
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        before = model(ids).logits
        handle = mmskip.apply(model, mmskip.LayerSkipConfig(schedule=mmskip.schedules.unified(2.0), phase="all"))
        skipped = model(ids).logits
        stats = handle.stats()
        handle.remove()
        after = model(ids).logits
    assert stats["skipped_layers"], stats
    assert not torch.equal(skipped, before), "layer skipping changed nothing"
    assert torch.equal(after, before), "remove() did not restore the model's outputs"
    print(f"mmskip {mmskip.__version__} wheel: skipped layers {stats['skipped_layers']}, "
          f"FLOPs fraction {stats['flops_fraction']:.2f}, outputs restored exactly")


if __name__ == "__main__":
    main()
