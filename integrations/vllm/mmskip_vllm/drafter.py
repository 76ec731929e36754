"""``LayerDrafter``: the served model's own kept sublayers, run outside vLLM's attention backend.

vLLM's ``custom_class`` proposer is called with token ids only (no request ids, block tables or
attention metadata), so the draft cannot read or write vLLM's paged KV cache through public
interfaces. It shares the served model's weights (the very modules vLLM loaded) and keeps a small
dense KV cache of its own for the kept attention layers, per batch row. The row's cache is keyed
by the tokens it was computed on: each call keeps the common prefix with the row's current tokens
(rejected drafts and reassigned rows fall away) and runs only what is new.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .draft_spec import DraftSpec

__all__ = ["LayerDrafter", "RowCache"]


@dataclass
class RowCache:
    """One batch row's draft KV: token ids it covers and K/V per kept attention layer."""

    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    length: int = 0

    def common_prefix(self, context: np.ndarray) -> int:
        """How many leading tokens of ``context`` this cache already holds."""
        n = min(self.length, len(context))
        if n == 0:
            return 0
        diff = np.flatnonzero(self.tokens[:n] != context[:n])
        return int(diff[0]) if len(diff) else n

    def nbytes(self) -> int:
        """Bytes held by the K/V buffers."""
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))


class LayerDrafter:
    """Runs the kept sublayers of a vLLM Llama-family model (``model.model.layers``) on a few
    tokens of one row, with the row's own dense KV cache."""

    def __init__(self, target: torch.nn.Module, spec: DraftSpec) -> None:
        self.target = target
        self.inner = target.model
        self.spec = spec
        layers = self.inner.layers
        if len(layers) != spec.num_layers:
            raise ValueError(f"served model has {len(layers)} layers, the draft spec {spec.num_layers}")
        first = layers[0].self_attn
        self.num_heads, self.num_kv_heads, self.head_dim = first.num_heads, first.num_kv_heads, first.head_dim
        self.plain = all(_plain_layer(layer) for layer in layers[:spec.last_layer])

    def run(self, row: RowCache, tokens: np.ndarray, start: int) -> torch.Tensor:
        """Run ``tokens`` (positions ``start``..) through the draft, appending their K/V to ``row``
        (which must hold exactly ``start`` tokens); return the last token's logits."""
        n = len(tokens)
        ids = torch.as_tensor(tokens, dtype=torch.long)
        positions = torch.arange(start, start + n, dtype=torch.long)
        h = self.inner.embed_input_ids(ids)
        spec = self.spec
        for i in range(spec.last_layer):
            layer = self.inner.layers[i]
            if i not in spec.attn_skip:
                h = h + self._attention(layer.self_attn, self._norm(layer.input_layernorm, h), positions, row, i, start)
            if i not in spec.mlp_skip:
                h = h + self._mlp(layer.mlp, self._norm(layer.post_attention_layernorm, h))
        row.tokens = _grown(row.tokens, start + n)
        row.tokens[start:start + n] = tokens
        row.length = start + n
        return self.target.compute_logits(self._norm(self.inner.norm, h[-1:]))[0]

    def _norm(self, norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not self.plain:
            return norm(x)
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + norm.variance_epsilon)).to(x.dtype) * norm.weight

    def _mlp(self, mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not self.plain:
            return mlp(x)
        gate, up = _linear(mlp.gate_up_proj, x).chunk(2, dim=-1)
        return _linear(mlp.down_proj, F.silu(gate) * up)

    def _attention(self, attn: torch.nn.Module, x: torch.Tensor, positions: torch.Tensor, row: RowCache,
                   i: int, start: int) -> torch.Tensor:
        n = x.shape[0]
        if self.plain:
            qkv = _linear(attn.qkv_proj, x)
            q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
            cos, sin = attn.rotary_emb.cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
            q, k = _rotate(q, cos, sin, self.head_dim), _rotate(k, cos, sin, self.head_dim)
        else:
            qkv, _ = attn.qkv_proj(x)
            q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
            q, k = attn.rotary_emb(positions, q, k)
        end = start + n
        keys = row.keys.get(i)
        if keys is None or keys.shape[1] < end:
            keys = _grown_kv(keys, end, self.num_kv_heads, self.head_dim, x)
            row.keys[i] = keys
            row.values[i] = _grown_kv(row.values.get(i), end, self.num_kv_heads, self.head_dim, x)
        values = row.values[i]
        keys[:, start:end] = k.view(n, self.num_kv_heads, self.head_dim).transpose(0, 1)
        values[:, start:end] = v.view(n, self.num_kv_heads, self.head_dim).transpose(0, 1)
        qh = q.view(n, self.num_heads, self.head_dim).transpose(0, 1)
        kh, vh = keys[:, :end], values[:, :end]
        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            kh, vh = kh.repeat_interleave(rep, 0), vh.repeat_interleave(rep, 0)
        mask = None
        if n > 1:
            mask = torch.arange(end).unsqueeze(0) <= (torch.arange(n) + start).unsqueeze(1)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=attn.scaling)
        out = out.transpose(0, 1).reshape(n, self.num_heads * self.head_dim)
        if self.plain:
            return _linear(attn.o_proj, out)
        o, _ = attn.o_proj(out)
        return o


def _plain_layer(layer: torch.nn.Module) -> bool:
    """Whether the layer's parts are plain (unquantized, SiLU, full NeoX rotary), so the draft can
    do norms, rotary and activation in torch instead of vLLM's custom-op modules (their dispatch
    costs more than the math at batch size 1); otherwise the modules run."""
    attn, mlp = layer.self_attn, layer.mlp
    linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    rope = attn.rotary_emb
    return (all(type(m.quant_method).__name__ == "UnquantizedLinearMethod" for m in linears)
            and type(mlp.act_fn).__name__ == "SiluAndMul" and rope.is_neox_style
            and rope.rotary_dim == attn.head_dim and rope.cos_sin_cache.dtype == attn.qkv_proj.weight.dtype)


def _linear(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An unquantized vLLM linear layer: plain ``F.linear`` while its weight is there (vLLM's CPU
    backend may have moved it into a prepacked kernel, then the module runs)."""
    if m.weight.numel() and not m.skip_bias_add:
        return F.linear(x, m.weight, m.bias)
    return m(x)[0]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """NeoX-style rotary embedding on ``[tokens, heads * head_dim]``."""
    n = x.shape[0]
    x = x.view(n, -1, head_dim)
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).view(n, -1)


def _grown(a: np.ndarray, n: int) -> np.ndarray:
    if len(a) >= n:
        return a
    out = np.zeros(max(n, 2 * len(a), 64), dtype=np.int64)
    out[:len(a)] = a
    return out


def _grown_kv(t: torch.Tensor | None, n: int, heads: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    cap = max(n, 64 if t is None else 2 * t.shape[1])
    out = like.new_zeros(heads, cap, dim)
    if t is not None:
        out[:, :t.shape[1]] = t
    return out
