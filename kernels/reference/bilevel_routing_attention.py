"""Bi-level routing attention (BiFormer, Zhu et al., CVPR 2023) in readable PyTorch.

The ground truth for the Triton kernels. Written from the paper's description:

1. split the ``H x W`` map into ``S x S`` regions (``S = num_regions``);
2. region-level query/key = mean of the queries/keys of each region (all heads
   together, i.e. over the full ``heads * head_dim`` channels, so one routing is
   shared by every head); region affinity ``A = (q_r * scale) @ k_r^T``;
3. each query region keeps the ``topk`` key regions of highest affinity;
4. every query token of a region attends, with one softmax, to all tokens of its
   routed key regions (K/V gathered here; the Triton kernel reads them in place).

Sizes that are not multiples of ``S`` (or smaller than ``S``: regions of one token)
are padded at the bottom/right to ``S * ceil(H / S)``; padded tokens are *masked*:
they take no part in the region means (a region mean averages only its real tokens; a
region without real tokens has mean 0 and, as a key region, affinity ``-inf`` so that
it is routed last) and receive no attention mass. As real regions are routed first and
``topk >= 1``, every softmax row holds at least one real key, so masking never leaves a
row all ``-inf``; outputs of padded query slots are cropped. Routing is computed without
gradient (top-k selection is not differentiable; the official code detaches q/k for it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def region_grid(h: int, w: int, num_regions: int) -> tuple[int, int]:
    """Region height and width (in tokens) for an ``h x w`` map split ``num_regions`` per side."""
    return math.ceil(h / num_regions), math.ceil(w / num_regions)


def to_regions(x: torch.Tensor, num_regions: int) -> torch.Tensor:
    """``[B, H, W, *rest]`` (H, W multiples of ``num_regions``) -> ``[B, S*S, rh*rw, *rest]``."""
    b, h, w = x.shape[:3]
    rest = x.shape[3:]
    s = num_regions
    x = x.reshape(b, s, h // s, s, w // s, *rest)
    x = x.transpose(2, 3)  # [B, S, S, rh, rw, *rest]
    return x.reshape(b, s * s, (h // s) * (w // s), *rest)


def from_regions(x: torch.Tensor, num_regions: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`to_regions` for a padded map of size ``h x w``."""
    b = x.shape[0]
    rest = x.shape[3:]
    s = num_regions
    x = x.reshape(b, s, s, h // s, w // s, *rest).transpose(2, 3)
    return x.reshape(b, h, w, *rest)


def pad_map(x: torch.Tensor, hp: int, wp: int) -> torch.Tensor:
    """Zero-pad ``[B, H, W, heads, dim]`` at the bottom/right to ``[B, hp, wp, heads, dim]``."""
    h, w = x.shape[1:3]
    if (h, w) == (hp, wp):
        return x
    return F.pad(x, (0, 0, 0, 0, 0, wp - w, 0, hp - h))


def valid_tokens(h: int, w: int, num_regions: int, device: torch.device) -> torch.Tensor:
    """Bool ``[S*S, rh*rw]``: which token slots of each region lie inside the real ``h x w`` map."""
    rh, rw = region_grid(h, w, num_regions)
    valid = torch.zeros(rh * num_regions, rw * num_regions, dtype=torch.bool, device=device)
    valid[:h, :w] = True
    return to_regions(valid[None], num_regions)[0]


def routing_indices(
    q: torch.Tensor, k: torch.Tensor, num_regions: int, topk: int, scale: float
) -> torch.Tensor:
    """Top-k key regions of every query region, shape ``[batch, S*S, topk']`` (int64).

    ``topk' = S*S`` when ``topk == -1`` or ``topk >= S*S``. Indices are ordered by
    decreasing affinity (as ``torch.topk`` returns them). No gradient flows here.
    """
    b, h, w = q.shape[:3]
    s = num_regions
    rh, rw = region_grid(h, w, s)
    with torch.no_grad():
        # Routing runs at least in float32 (float64 stays float64).
        dtype = torch.promote_types(q.dtype, torch.float32)

        def region_sums(x):  # [B, H, W, heads, d] -> [B, S*S, heads*d] in `dtype`: no float32 copy of x
            # two reductions over outer dims (rows of a region, then its columns): contiguous inner loops
            x = pad_map(x.detach(), rh * s, rw * s).reshape(b, s, rh, s * rw, -1).sum(2, dtype=dtype)
            return x.view(b, s * s, rw, -1).sum(2)

        q_r, k_r = region_sums(q), region_sums(k)  # padded slots hold zeros
        padded = (h, w) != (rh * s, rw * s)
        valid = valid_tokens(h, w, s, q.device) if padded else None  # [R, T]
        count = valid.sum(1).clamp(min=1).to(dtype)[:, None] if padded else rh * rw  # real tokens per region
        affinity = (q_r / count * scale) @ (k_r / count).transpose(-2, -1)  # [B, R, R]
        if padded and ((s - 1) * rh >= h or (s - 1) * rw >= w):  # the last region row/column is empty
            affinity = affinity.masked_fill(~valid.any(1)[None, None, :], float("-inf"))
        n = s * s if topk == -1 else min(topk, s * s)
        return torch.topk(affinity, k=n, dim=-1).indices


def bilevel_routing_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    routing: torch.Tensor,
    num_regions: int,
    scale: float,
) -> torch.Tensor:
    """Attention of each query region over the tokens of its routed key regions.

    q, k: ``[B, H, W, heads, d]``; v: ``[B, H, W, heads, dv]``; routing:
    ``[B, S*S, topk]`` key-region indices. Returns ``[B, H, W, heads, dv]``.
    Differentiable in q, k, v (the routing is an input, not differentiated).
    """
    b, h, w = q.shape[:3]
    s = num_regions
    rh, rw = region_grid(h, w, s)
    hp, wp = rh * s, rw * s

    q_reg = to_regions(pad_map(q, hp, wp), s)  # [B, R, T, heads, d]
    k_reg = to_regions(pad_map(k, hp, wp), s)
    v_reg = to_regions(pad_map(v, hp, wp), s)

    # Gather the routed key/value regions: [B, R, topk, T, heads, d] -> [B, R, topk*T, heads, d].
    batch_idx = torch.arange(b, device=q.device)[:, None, None]
    k_sel = k_reg[batch_idx, routing].flatten(2, 3)
    v_sel = v_reg[batch_idx, routing].flatten(2, 3)
    key_valid = valid_tokens(h, w, s, q.device)[routing].flatten(2)  # [B, R, topk*T]

    scores = torch.einsum("brqhd,brkhd->brhqk", q_reg * scale, k_sel)  # [B, R, heads, T, topk*T]
    scores = scores.masked_fill(~key_valid[:, :, None, None, :], float("-inf"))
    attn = scores.softmax(dim=-1)
    out = torch.einsum("brhqk,brkhd->brqhd", attn, v_sel)  # [B, R, T, heads, dv]
    return from_regions(out, s, hp, wp)[:, :h, :w]
