"""Bi-level routing attention on CPU (and any device) through one batched SDPA call.

The reference lays q/k/v out per region, gathers whole routed regions with advanced indexing and
runs two einsums that permute their operands, plus a key mask even where nothing is padded. Here
one ``torch.nn.functional.scaled_dot_product_attention`` call does the attention, in one of two
exact layouts (the same keys, the same softmax as
:func:`~visattn.kernels.reference.bilevel_routing_attention.bilevel_routing_attention_reference`):

* gathered (few routed regions): the keys and values of every query region's routed regions are
  picked straight from the map with one ``index_select`` of token rows per tensor (``topk`` copies
  of K and V, no region-layout copy first) into ``[B * S*S, topk * T, heads, c]``; q is laid out per
  region once; SDPA runs over ``(batch * region, head)`` through strided head views. The key mask
  is passed only when the map is padded.
* dense masked (``topk`` a large share of the ``S*S`` regions, as BiFormer's top-16 of 49): every
  query attends to the whole map under a boolean mask of its routed regions; ``S*S / topk`` times
  the logits of the gathered layout, but q/k/v are read in place and nothing is copied, which is
  cheaper on CPU once the ``topk`` copies of K/V outweigh the extra logits.

Autograd goes through SDPA (and ``index_select``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from visattn.kernels.reference.bilevel_routing_attention import (
    pad_map,
    region_grid,
    to_regions,
    valid_tokens,
)

# Dense masked attention when 4 * topk >= S*S: at BiFormer-S stage 3 (top-16 of 49 regions, 14x14,
# 8 heads) forward+backward took 3.4 ms dense vs 4.5 ms gathered (one CPU thread, thread time).
DENSE_SHARE = 4


def _gathered(q, k, v, routing, s, scale):
    b, h, w, heads = q.shape[:4]
    rh, rw = region_grid(h, w, s)
    hp, wp = rh * s, rw * s
    n_regions, tokens, topk = s * s, rh * rw, routing.shape[-1]
    # flat map position (in the padded map of batch b) of every routed key slot: [B, S*S, topk, T]
    position = to_regions(torch.arange(hp * wp, device=q.device).view(1, hp, wp), s)[0]  # [S*S, T]
    index = (torch.arange(b, device=q.device).view(b, 1, 1, 1) * (hp * wp) + position[routing]).flatten()

    def routed(x):  # -> [B * S*S, heads, topk * T, c], a view of a [B * S*S, topk * T, heads, c] copy
        picked = pad_map(x, hp, wp).reshape(b * hp * wp, -1).index_select(0, index)
        return picked.view(b * n_regions, topk * tokens, heads, -1).transpose(1, 2)

    q_r = to_regions(pad_map(q, hp, wp), s).reshape(b * n_regions, tokens, heads, -1).transpose(1, 2)
    mask = None
    if (h, w) != (hp, wp):  # padded key slots receive no attention
        mask = valid_tokens(h, w, s, q.device)[routing].view(b * n_regions, 1, 1, topk * tokens)
    out = F.scaled_dot_product_attention(q_r, routed(k), routed(v), attn_mask=mask, scale=scale)
    out = out.transpose(1, 2).reshape(b, s, s, rh, rw, heads, -1).transpose(2, 3)  # [B, S, RH, S, RW, ...]
    return out.reshape(b, hp, wp, heads, -1)


def _dense_masked(q, k, v, routing, s, scale):
    b, h, w, heads = q.shape[:4]
    rh, rw = region_grid(h, w, s)
    hp, wp = rh * s, rw * s
    device = q.device
    # region of every position of the padded map, row-major: [hp * wp]
    rows, cols = torch.arange(hp, device=device), torch.arange(wp, device=device)
    region = (rows[:, None] // rh * s + cols // rw).flatten()
    routed = torch.zeros(b, s * s, s * s, dtype=torch.bool, device=device).scatter_(2, routing, True)
    mask = routed[:, region][:, :, region]  # [B, query position, key position]
    if (h, w) != (hp, wp):  # padded key slots receive no attention
        valid = torch.zeros(hp, wp, dtype=torch.bool, device=device)
        valid[:h, :w] = True
        mask = mask & valid.flatten()

    def flat(x):  # [B, heads, hp * wp, c] view
        return pad_map(x, hp, wp).reshape(b, hp * wp, heads, -1).transpose(1, 2)

    out = F.scaled_dot_product_attention(flat(q), flat(k), flat(v), attn_mask=mask[:, None], scale=scale)
    return out.transpose(1, 2).reshape(b, hp, wp, heads, -1)


def bilevel_routing_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    routing: torch.Tensor,
    num_regions: int,
    scale: float,
    dense: bool | None = None,
) -> torch.Tensor:
    """q, k ``[B, H, W, heads, d]``; v ``[B, H, W, heads, dv]``; routing ``[B, S*S, topk]``
    key-region indices. Returns ``[B, H, W, heads, dv]``. ``dense``: force the layout (default:
    dense masked when ``DENSE_SHARE * topk >= S*S``)."""
    h, w = q.shape[1:3]
    if dense is None:
        dense = DENSE_SHARE * routing.shape[-1] >= num_regions**2
    fn = _dense_masked if dense else _gathered
    return fn(q, k, v, routing, num_regions, scale)[:, :h, :w]
