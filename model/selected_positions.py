"""The last transformer block evaluated at selected positions only (`GPT.hidden_states(..., positions=...)`).

Scoring (CORE) needs the final hidden state at a few positions per row, and filling a KV cache needs every
layer's keys and values but no output at all. Every block but the last must still run everywhere (later
layers attend to all positions), but the last block's output feeds nothing except the final norm. So the
last block computes its keys and values at every position (the KV cache and the attention need them) and
its query, attention, output projection and MLP only at the selected positions; the backout and the
final norm then also run only there. With no position selected (S = 0) it only writes the cache.

A selected query attends causally, within the layer's window, to the keys of its own row: an explicit
per-query boolean mask over the row's keys (cached ones included), built from the query positions. The
result equals the full forward's at those positions up to float rounding (smaller GEMM / attention shapes
give different last bits); callers that need more than that (CORE) re-check near-ties.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x[b, positions[b, s]] for x (B x T x ...) and positions (B x S): B x S x ... (broadcast over B when
    x has one row)."""
    if x.size(0) != positions.size(0):
        x = x.expand(positions.size(0), *x.shape[1:])
    rows = torch.arange(positions.size(0), device=positions.device).unsqueeze(1)
    return x[rows, positions]


def _write_kv(kv_cache, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Write this chunk's k, v (B x T x Hkv x D) at each row's cache position, as flash_attn_with_kvcache
    does; returns the layer's keys and values up to the furthest row's end."""
    k_cache, v_cache = kv_cache.get_layer_cache(layer_idx)
    T, starts = k.size(1), kv_cache.positions
    if max(starts) + T > k_cache.size(1):
        raise ValueError(f"KV cache overflow: {max(starts)} + {T} > {k_cache.size(1)} slots")
    if kv_cache.uniform:
        p = starts[0]
        k_cache[:, p:p + T] = k.to(k_cache.dtype)
        v_cache[:, p:p + T] = v.to(v_cache.dtype)
    else:
        rows = torch.arange(len(starts), device=k.device).unsqueeze(1)
        slots = torch.tensor(starts, device=k.device).unsqueeze(1) + torch.arange(T, device=k.device)
        k_cache[rows, slots] = k.to(k_cache.dtype)
        v_cache[rows, slots] = v.to(v_cache.dtype)
    end = max(starts) + T
    return k_cache[:, :end], v_cache[:, :end]


def attention_at_positions(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_positions: torch.Tensor,
                           window: int) -> torch.Tensor:
    """Causal sliding-window attention of q (B x S x H x D), whose query (b, s) sits at key position
    query_positions[b, s], over k, v (B x Tk x Hkv x D): it sees keys j with 0 <= p - j <= window
    (window < 0: unlimited). Returns B x S x H x D."""
    key_positions = torch.arange(k.size(1), device=q.device)
    distance = query_positions.unsqueeze(-1) - key_positions  # B x S x Tk
    allow = distance >= 0
    if window >= 0:
        allow = allow & (distance <= window)
    kwargs = {"enable_gqa": True} if q.size(2) != k.size(2) else {}
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype),
                                       attn_mask=allow.unsqueeze(1), **kwargs)
    return y.transpose(1, 2)


def block_at_positions(block, x: torch.Tensor, ve: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                       window: int, positions: torch.Tensor, kv_cache=None) -> torch.Tensor:
    """`block(x, ...)` (model/gpt.py: Block) at `positions` (B x S, within this chunk) only: B x S x C.
    Keys and values are computed (and cached) at every position; the rest only where selected."""
    from model.gpt import norm  # gpt.py imports this module

    attn = block.attn
    B, T, _ = x.shape
    u = norm(x)
    k, v = attn.keys_values(u, ve, cos, sin)
    if kv_cache is None:
        keys, values, offsets = k, v, None
    else:
        keys, values = _write_kv(kv_cache, attn.layer_idx, k, v)
        offsets = torch.tensor(kv_cache.positions, device=x.device).unsqueeze(1)  # B x 1: each row's first slot
    S = positions.size(1)
    if S == 0:
        return x.new_empty(B, 0, x.size(2))
    x_sel, u_sel = gather_positions(x, positions), gather_positions(u, positions)
    cos_sel, sin_sel = gather_positions(cos, positions), gather_positions(sin, positions)  # B x S x 1 x D/2
    q = attn.queries(u_sel, cos_sel, sin_sel)
    y = attention_at_positions(q, keys, values, positions if offsets is None else positions + offsets, window)
    x_sel = x_sel + attn.c_proj(y.contiguous().view(B, S, attn.n_head * attn.head_dim))
    return x_sel + block.mlp(norm(x_sel))
