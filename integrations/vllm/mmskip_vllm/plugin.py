"""vLLM general plugin (entry point ``vllm.general_plugins``): registers mmskip's model classes and
the start-up check of mmskip settings."""

from __future__ import annotations

__all__ = ["register"]


def register() -> None:
    """Called by vLLM in every process: make ``MmskipLlamaForCausalLM`` an architecture
    (imported lazily, when a config names it), and check mmskip settings when a config is built."""
    from vllm import ModelRegistry

    from .config_check import install

    install()

    if "MmskipLlamaForCausalLM" not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model("MmskipLlamaForCausalLM", "mmskip_vllm.layer_skip:MmskipLlamaForCausalLM")
