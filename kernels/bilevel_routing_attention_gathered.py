"""Bi-level routing attention on CPU (and any device): one gather of the routed tokens, one SDPA.

The reference lays q/k/v out per region, gathers whole routed regions with advanced indexing and
runs two einsums that permute their operands, plus a key mask even where nothing is padded. Here the
keys and values of every query region's routed regions are picked straight from the map with one
``index_select`` of token rows per tensor (``topk`` copies of K and V, no region-layout copy
first), into ``[B * S*S, topk * T, heads, c]``; q is laid out per region once, and one batched
``torch.nn.functional.scaled_dot_product_attention`` over ``(batch * region, head)`` reads these
through strided head views. The key mask is passed only when the map is padded. Exact: the same
keys and the same softmax as
:func:`~visattn.kernels.reference.bilevel_routing_attention.bilevel_routing_attention_reference`;
autograd goes through SDPA and ``index_select``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from visattn.kernels.reference.bilevel_routing_attention import (
    _pad_map,
    _to_regions,
    _valid_tokens,
    region_grid,
)


def bilevel_routing_attention_gathered(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    routing: torch.Tensor,
    num_regions: int,
    scale: float,
) -> torch.Tensor:
    """q, k ``[B, H, W, heads, d]``; v ``[B, H, W, heads, dv]``; routing ``[B, S*S, topk]``
    key-region indices. Returns ``[B, H, W, heads, dv]``."""
    b, h, w, heads = q.shape[:4]
    s = num_regions
    rh, rw = region_grid(h, w, s)
    hp, wp = rh * s, rw * s
    n_regions, tokens, topk = s * s, rh * rw, routing.shape[-1]

    # flat map position (in the padded map of batch b) of every routed key slot: [B, S*S, topk, T]
    position = _to_regions(torch.arange(hp * wp, device=q.device).view(1, hp, wp), s)[0]  # [S*S, T]
    index = (torch.arange(b, device=q.device).view(b, 1, 1, 1) * (hp * wp) + position[routing]).flatten()

    def routed(x):  # -> [B * S*S, heads, topk * T, c], a view of a [B * S*S, topk * T, heads, c] copy
        picked = _pad_map(x, hp, wp).reshape(b * hp * wp, -1).index_select(0, index)
        return picked.view(b * n_regions, topk * tokens, heads, -1).transpose(1, 2)

    q_r = _to_regions(_pad_map(q, hp, wp), s).reshape(b * n_regions, tokens, heads, -1).transpose(1, 2)
    mask = None
    if (h, w) != (hp, wp):  # padded key slots receive no attention
        mask = _valid_tokens(h, w, s, q.device)[routing].view(b * n_regions, 1, 1, topk * tokens)
    out = F.scaled_dot_product_attention(q_r, routed(k), routed(v), attn_mask=mask, scale=scale)
    out = out.transpose(1, 2).reshape(b, s, s, rh, rw, heads, -1).transpose(2, 3)  # [B, S, RH, S, RW, ...]
    return out.reshape(b, hp, wp, heads, -1)[:, :h, :w]
