"""PyTorch reference of attention with visual-sink redistribution (VAR, Kang et al., ICLR 2025).

Readable ground truth for :func:`visattn.kernels.visual_sink_attention`: it forms the attention
probabilities of a chunk of queries, redistributes them with :func:`redistribute` and applies them
to the values.
"""

from __future__ import annotations

import torch

from visattn.kernels.reference.attention_with_key_mass import additive_mask, masked_scores, masked_softmax

OTHER, TEXT_SINK, VISUAL_SINK, VISUAL = 0, 1, 2, 3


def redistribute(
    probs: torch.Tensor,
    category: torch.Tensor,
    query_mask: torch.Tensor,
    fraction: float,
    rho: float,
    min_image_attention: float,
) -> torch.Tensor:
    """VAR's rule on probabilities ``[B, H, Nq, Nk]``; ``category`` ``[B, Nk]``; ``query_mask`` ``[B, Nq]``.

    A (head, query) row is *image-centric* when its query is in ``query_mask``, the attention it
    gives to all image tokens is ``>= min_image_attention`` and the non-sink image tokens get at least
    ``rho`` of that. In those rows every sink (visual or text) keeps ``1 - fraction`` of its weight
    and the removed budget is shared by the non-sink image tokens in proportion to their weights.
    Rows still sum to one.
    """
    sink = ((category == TEXT_SINK) | (category == VISUAL_SINK))[:, None, None, :]
    vns = (category == VISUAL)[:, None, None, :]
    a_sink = (probs * sink).sum(-1)
    a_vns = (probs * vns).sum(-1)
    a_vis = a_vns + (probs * (category == VISUAL_SINK)[:, None, None, :]).sum(-1)
    chosen = query_mask[:, None, :] & (a_vis >= min_image_attention) & (a_vns >= rho * a_vis) & (a_vns > 0)
    gain = torch.where(chosen, fraction * a_sink / a_vns.clamp_min(torch.finfo(probs.dtype).tiny), 0.0)
    scale = torch.where(chosen, 1.0 - fraction, 1.0)
    return probs * torch.where(sink, scale[..., None], 1.0) + probs * vns * gain[..., None]


def visual_sink_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    category: torch.Tensor,
    query_mask: torch.Tensor,
    fraction: float,
    rho: float,
    min_image_attention: float,
    attn_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """``[B, Nq, H, Dv]`` output of redistributed attention; shapes as in the public op."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    heads, kv_heads = q.shape[2], k.shape[2]
    vv = v.repeat_interleave(heads // kv_heads, dim=2) if kv_heads != heads else v
    bias = additive_mask(attn_mask)
    outs = []
    for start in range(0, q.shape[1], chunk):
        rows = slice(start, min(start + chunk, q.shape[1]))
        p = masked_softmax(masked_scores(q, k, rows, scale, bias, causal))
        p = redistribute(p, category, query_mask[:, rows], fraction, rho, min_image_attention)
        outs.append(torch.einsum("bhqk,bkhd->bqhd", p, vv.to(p.dtype)))
    return torch.cat(outs, dim=1).to(q.dtype)
