"""A bad mmskip setting stops ``LLM(...)`` while vLLM builds its config, in the calling process and
before any engine process starts, with one ``MmskipConfigError`` whose one-line message says what
to change (the server's exit is checked in test_server.py)."""

from __future__ import annotations

from typing import Any

import pytest
from mmskip_vllm import DraftConfigError, LayerSkipConfigError, MmskipConfigError

from mmskip.layer_skip import LayerSkipConfig
from mmskip.schedules import explicit
from tests_vllm.support import ENGINE, SKIP_LM

SPEC = {"method": "custom_class", "model": "mmskip_vllm.SelfSpeculativeProposer", "num_speculative_tokens": 4}
ARCH = {"architectures": ["MmskipLlamaForCausalLM"]}


@pytest.mark.parametrize(
    ("overrides", "speculative", "error", "message"),
    [
        ({"mmskip_draft": {"exit_layer": 99}}, SPEC, DraftConfigError,
         "mmskip_draft.exit_layer must be an int in 1..23 (the served model has 24 layers), got 99"),
        ({"mmskip_draft": {"exit_layer": "12"}}, SPEC, DraftConfigError,
         "mmskip_draft.exit_layer must be an int in 1..23 (the served model has 24 layers), got '12'"),
        ({"mmskip_draft": {"exit_layer": 8, "max_drafting": 2}}, SPEC, DraftConfigError,
         "mmskip_draft has no setting(s) ['max_drafting']; its settings are"),
        ({"mmskip_draft": {"attn_skip": [3, 30]}}, SPEC, DraftConfigError,
         "mmskip_draft skips layers [30], but the served model has layers 0..23"),
        ({"mmskip_draft": {"exit_layer": 8, "adaptive": "yes"}}, SPEC, DraftConfigError,
         "mmskip_draft.adaptive must be true or false, got 'yes'"),
        ({}, SPEC, DraftConfigError, "mmskip self-speculation needs a draft"),
        ({"mmskip_draft": {"exit_layer": 8}}, None, MmskipConfigError,
         "mmskip_draft is set, but nothing drafts with it"),
        ({**ARCH, "mmskip_layer_skip": LayerSkipConfig(schedule=explicit(skip=[22, 30]), phase="all").to_dict()},
         None, LayerSkipConfigError, "mmskip_layer_skip: explicit(): indices [30] out of range for 24 items"),
        ({**ARCH, "mmskip_layer_skip": LayerSkipConfig(schedule=explicit(skip=[20])).to_dict()},
         None, LayerSkipConfigError, "vLLM serving offers only phase='all'"),
        ({"mmskip_layer_skip": LayerSkipConfig(schedule=explicit(skip=[20]), phase="all").to_dict()},
         None, MmskipConfigError, "add 'architectures': ['MmskipLlamaForCausalLM'] to hf_overrides"),
    ],
)
def test_bad_config_refuses_llm_at_config_time(overrides: dict[str, Any], speculative: dict | None,
                                               error: type[Exception], message: str) -> None:
    from vllm import LLM

    with pytest.raises(MmskipConfigError) as info:
        LLM(model=SKIP_LM, hf_overrides=overrides, speculative_config=speculative, **ENGINE)
    assert type(info.value) is error  # raised as is: not wrapped by pydantic or an engine start-up failure
    text = str(info.value)
    assert message in text and "\n" not in text
