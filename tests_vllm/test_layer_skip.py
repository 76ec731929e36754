"""Layer skipping in vLLM serving (``MmskipLlamaForCausalLM``): the same greedy tokens as mmskip's
transformers path with the same ``LayerSkipConfig`` in float32, and the configs vLLM cannot serve
are refused with the reason."""

from __future__ import annotations

import contextlib

import pytest
import torch

import mmskip
from mmskip.layer_skip import LayerSkipConfig
from mmskip.schedules import explicit, unified
from tests_vllm.support import ENGINE, NEW_TOKENS, SKIP_LM, close, greedy

SKIP = (17, 18, 19, 20, 21, 22)


def _transformers_tokens(ids: list[list[int]], config: LayerSkipConfig | None) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(SKIP_LM, dtype=torch.float32).eval()
    out = []
    with contextlib.ExitStack() as stack, torch.inference_mode():
        if config is not None:
            stack.enter_context(mmskip.applied(model, config))
        for row in ids:
            x = torch.tensor([row])
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                               min_new_tokens=NEW_TOKENS, do_sample=False)
            out.append(y[0, len(row):].tolist())
    return out


def test_served_tokens_equal_mmskip_transformers_path(prompts: list[str]) -> None:
    from transformers import AutoTokenizer
    from vllm import LLM

    config = LayerSkipConfig(schedule=explicit(skip=SKIP), phase="all")
    ids = [AutoTokenizer.from_pretrained(SKIP_LM)(p)["input_ids"] for p in prompts[:12]]
    llm = LLM(model=SKIP_LM, hf_overrides={"architectures": ["MmskipLlamaForCausalLM"],
                                           "mmskip_layer_skip": config.to_dict()}, **ENGINE)
    try:
        outs = llm.generate([{"prompt_token_ids": row} for row in ids], greedy(), use_tqdm=False)
    finally:
        close(llm)
    served = [list(o.outputs[0].token_ids) for o in outs]
    assert served == _transformers_tokens(ids, config)
    assert served != _transformers_tokens(ids, None)  # the skip set changes the output: it was applied


def test_layer_skip_set_refusals() -> None:
    from mmskip_vllm.config_check import layer_skip_set
    from mmskip_vllm.errors import LayerSkipConfigError

    assert layer_skip_set(LayerSkipConfig(schedule=explicit(skip=SKIP), phase="all").to_dict(), 24) == SKIP
    assert len(layer_skip_set(LayerSkipConfig(schedule=unified(2.0), phase="all").to_json(), 24)) == 12
    with pytest.raises(LayerSkipConfigError, match="only phase='all'"):
        layer_skip_set(LayerSkipConfig(schedule=explicit(skip=SKIP)).to_dict(), 24)
    with pytest.raises(LayerSkipConfigError, match="needs hf_overrides"):
        layer_skip_set(None, 24)
    with pytest.raises(LayerSkipConfigError, match="mmskip_layer_skip: unknown technique"):
        layer_skip_set({"technique": "nope"}, 24)
