"""Reference computations for the cache-consistency tests: full no-cache recomputes."""

from __future__ import annotations

import torch


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as generate() derives them for a left-padded batch."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


@torch.no_grad()
def recompute_logits(model, adapter, seq, prompt_mask, skip_from, skip_layers=(), mlp_skips=()):
    """Logits of ``seq`` (prompt + generated) in one no-cache forward where positions >= skip_from
    skip ``skip_layers`` and the FFNs listed in ``mlp_skips`` [(position, layer, rows)]."""
    new = seq.shape[1] - prompt_mask.shape[1]
    mask = torch.cat([prompt_mask, torch.ones(seq.shape[0], new, dtype=prompt_mask.dtype)], 1)
    handles = []
    for i in skip_layers:
        def keep_input(mod, args, kwargs, out):
            h = args[0] if args else kwargs["hidden_states"]
            out = out.clone()
            out[:, skip_from:] = h[:, skip_from:]
            return out
        handles.append(adapter.layers[i].register_forward_hook(keep_input, with_kwargs=True))
    by_layer = {}
    for pos, layer, rows in mlp_skips:
        by_layer.setdefault(layer, []).append((pos, rows))
    for layer, items in by_layer.items():
        def zero_mlp(mod, args, out, items=items):
            out = out.clone()
            for pos, rows in items:
                out[rows, pos] = 0
            return out
        handles.append(adapter.mlp(layer).register_forward_hook(zero_mlp))
    try:
        return model(input_ids=seq, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


def assert_steps_match(step_logits, ref, prompt_len: int) -> None:
    """Each generate step's logits (``output_logits``) equal the recompute's at the same position."""
    for t, logits in enumerate(step_logits):
        torch.testing.assert_close(logits, ref[:, prompt_len - 1 + t], atol=1e-4, rtol=1e-4)
