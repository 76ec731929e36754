"""``DraftSpec``: the draft's layer sets from ``hf_overrides`` settings, and the refusals."""

from __future__ import annotations

import pytest
from mmskip_vllm.draft_spec import DraftConfigError, DraftSpec

from mmskip.swift import SelfSpeculativeConfig


def test_exit_layer_skips_the_rest() -> None:
    spec = DraftSpec.from_settings({"exit_layer": 8}, 24)
    assert spec.attn_skip == spec.mlp_skip == frozenset(range(8, 24))
    assert spec.last_layer == 8
    assert spec.kept_fraction() == pytest.approx(8 / 24)
    assert spec.describe() == "early exit after layer 8 of 24"


def test_swift_config_folder_gives_its_fixed_set(tmp_path) -> None:
    SelfSpeculativeConfig(attn_skip=(3, 5), mlp_skip=(4, 22)).save_pretrained(tmp_path)
    spec = DraftSpec.from_settings({"swift_config": str(tmp_path), "max_drafting_requests": 2}, 24)
    assert (spec.attn_skip, spec.mlp_skip) == (frozenset({3, 5}), frozenset({4, 22}))
    assert spec.last_layer == 24 and spec.max_drafting_requests == 2


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (None, "needs a draft"),
        ({"exit_layer": 24}, "exit_layer must be an int in 1..23"),
        ({"exit_layer": 0}, "exit_layer must be an int in 1..23"),
        ({"exit_layer": 4, "attn_skip": [1]}, "exactly one of"),
        ({"exitlayer": 4}, "no setting(s) ['exitlayer']"),
        ({"attn_skip": [30]}, "skips layers [30]"),
        ({"attn_skip": []}, "skips nothing"),
        ({"exit_layer": 4, "max_drafting_requests": 0}, "max_drafting_requests must be >= 1"),
        ({"exit_layer": 4, "max_drafting_requests": 2.5}, "max_drafting_requests must be an int >= 1, got 2.5"),
        ({"exit_layer": True}, "exit_layer must be an int in 1..23"),
        ({"mlp_skip": "3"}, "mlp_skip must be a list of layer indices"),
        ([8], "mmskip_draft must be a dict"),
    ],
)
def test_bad_settings_say_what_to_change(settings, message: str) -> None:
    with pytest.raises(DraftConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        DraftSpec.from_settings(settings, 24)


def test_swift_config_without_a_fixed_set_is_refused(tmp_path) -> None:
    SelfSpeculativeConfig().save_pretrained(tmp_path)
    with pytest.raises(DraftConfigError, match="no fixed layer set"):
        DraftSpec.from_settings({"swift_config": str(tmp_path)}, 24)


def test_prompt_lookup_setting() -> None:
    on = DraftSpec.from_settings({"exit_layer": 8, "prompt_lookup": True}, 24)
    assert on.prompt_lookup == (2, 4)
    assert on.describe() == "prompt lookup (2-4-grams), else early exit after layer 8 of 24"
    assert DraftSpec.from_settings({"exit_layer": 8, "prompt_lookup": [1, 3]}, 24).prompt_lookup == (1, 3)
    assert DraftSpec.from_settings({"exit_layer": 8, "prompt_lookup": False}, 24).prompt_lookup is None
    for bad in ([3, 2], [0, 2], "yes", [2], [2.0, 3]):
        with pytest.raises(DraftConfigError, match="prompt_lookup must be true, false or"):
            DraftSpec.from_settings({"exit_layer": 8, "prompt_lookup": bad}, 24)
