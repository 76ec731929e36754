"""Check the mmskip settings in ``hf_overrides`` while vLLM builds its ``VllmConfig``, in the
process that parses the arguments, before any engine process starts.

A bad setting raises one ``MmskipConfigError`` with a one-line message that says what to change,
from ``LLM(...)`` or from the OpenAI server's start-up, instead of an engine core that fails
minutes later behind a wall of tracebacks from several processes. ``install`` (called by the
plugin, which vLLM loads before it parses any config) hooks the check into
``VllmConfig.try_verify_and_update_config``, the step where vLLM runs its own per-model checks.
"""

from __future__ import annotations

from typing import Any

from .draft_spec import DRAFT_KEY, DraftSpec
from .errors import LayerSkipConfigError, MmskipConfigError

__all__ = ["LAYER_SKIP_ARCH", "LAYER_SKIP_KEY", "PROPOSER", "check_config", "install", "layer_skip_set"]

LAYER_SKIP_KEY = "mmskip_layer_skip"
LAYER_SKIP_ARCH = "MmskipLlamaForCausalLM"
PROPOSER = "mmskip_vllm.SelfSpeculativeProposer"
_PROPOSER_PATHS = (PROPOSER, "mmskip_vllm.proposer.SelfSpeculativeProposer")
_installed = False


def layer_skip_set(settings: Any, num_layers: int) -> tuple[int, ...]:
    """The layers an ``mmskip.LayerSkipConfig`` (as ``to_dict()``, its JSON, or a saved config
    folder) skips in a model of ``num_layers`` layers; refuses anything vLLM cannot serve."""
    from mmskip.inject import SkipConfig
    from mmskip.layer_skip import LayerSkipConfig

    if settings is None:
        raise LayerSkipConfigError(
            f"{LAYER_SKIP_ARCH} needs hf_overrides={{'{LAYER_SKIP_KEY}': LayerSkipConfig(..., phase='all').to_dict()}}"
        )
    try:
        if isinstance(settings, str) and not settings.lstrip().startswith("{"):
            config = SkipConfig.from_pretrained(settings)
        else:
            config = SkipConfig.from_dict(settings)
    except (FileNotFoundError, ValueError, TypeError, KeyError) as err:
        raise LayerSkipConfigError(f"{LAYER_SKIP_KEY}: {err}") from None
    if not isinstance(config, LayerSkipConfig):
        raise LayerSkipConfigError(f"{LAYER_SKIP_KEY} holds a {type(config).__name__}; vLLM serving takes a LayerSkipConfig")
    if config.phase != "all":
        raise LayerSkipConfigError(
            f"{LAYER_SKIP_KEY}: vLLM serving offers only phase='all' (prompt and generated tokens share one "
            f"batch and one attention metadata per forward), got phase={config.phase!r}"
        )
    try:
        ratios = config.schedule.ratios(num_layers)
    except ValueError as err:
        raise LayerSkipConfigError(f"{LAYER_SKIP_KEY}: {err} (the served model has {num_layers} layers)") from None
    skip = tuple(i for i, r in enumerate(ratios) if r < 0.5)
    if len(skip) >= num_layers:
        raise LayerSkipConfigError(f"{LAYER_SKIP_KEY} skips all {num_layers} layers; keep at least one")
    return skip


def check_config(vllm_config: Any) -> None:
    """Refuse bad or stray mmskip settings of a ``VllmConfig`` (raises ``MmskipConfigError``)."""
    model_config = vllm_config.model_config
    if model_config is None:
        return
    hf_config = model_config.hf_config
    draft, skip = getattr(hf_config, DRAFT_KEY, None), getattr(hf_config, LAYER_SKIP_KEY, None)
    spec = vllm_config.speculative_config
    drafts = spec is not None and spec.method == "custom_class" and spec.model in _PROPOSER_PATHS
    serves_skip = model_config.architecture == LAYER_SKIP_ARCH
    if not (drafts or serves_skip or draft is not None or skip is not None):
        return
    num_layers = int(hf_config.get_text_config().num_hidden_layers)
    if drafts:
        DraftSpec.from_settings(draft, num_layers)
    elif draft is not None:
        raise MmskipConfigError(
            f"{DRAFT_KEY} is set, but nothing drafts with it: add speculative_config={{'method': 'custom_class', "
            f"'model': '{PROPOSER}', 'num_speculative_tokens': 4}}"
        )
    if serves_skip:
        layer_skip_set(skip, num_layers)
    elif skip is not None:
        raise MmskipConfigError(
            f"{LAYER_SKIP_KEY} is set, but the served architecture is {model_config.architecture}: add "
            f"'architectures': ['{LAYER_SKIP_ARCH}'] to hf_overrides"
        )


def install() -> None:
    """Run ``check_config`` first whenever vLLM verifies a ``VllmConfig`` (once per process)."""
    global _installed
    if _installed:
        return
    from vllm.config import VllmConfig

    verify = VllmConfig.try_verify_and_update_config

    def checked(self: Any) -> None:
        check_config(self)
        verify(self)

    VllmConfig.try_verify_and_update_config = checked
    _installed = True
