"""PyTorch reference of attention that also returns the attention mass each key received.

Readable ground truth for :func:`visattn.kernels.attention_with_key_mass`. It never holds the full
``[Nq, Nk]`` score matrix of all heads at once: queries are processed in chunks of ``chunk`` rows.
"""

from __future__ import annotations

import torch


def additive_mask(attn_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Turn a boolean (True = attend) or additive float mask into an additive float32 mask."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=torch.float32, device=attn_mask.device)
        return torch.where(attn_mask, zero, torch.finfo(torch.float32).min)
    return attn_mask.float()


def masked_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    rows: slice,
    scale: float,
    bias: torch.Tensor | None,
    causal: bool,
) -> torch.Tensor:
    """Scores ``[B, H, rows, Nk]`` (at least float32) for the query rows ``rows``, mask and causality applied.

    ``q``: ``[B, Nq, H, D]``; ``k``: ``[B, Nk, Hkv, D]`` (GQA: ``H`` a multiple of ``Hkv``);
    ``bias``: additive float32 ``[B or 1, H or 1, Nq or 1, Nk]``. Causality is bottom-right aligned
    (query ``i`` sees keys ``j <= i + Nk - Nq``), as for queries appended after a KV cache.
    """
    heads, kv_heads = q.shape[2], k.shape[2]
    nq, nk = q.shape[1], k.shape[1]
    kk = k.repeat_interleave(heads // kv_heads, dim=2) if kv_heads != heads else k
    ct = torch.promote_types(q.dtype, torch.float32)
    s = torch.einsum("bqhd,bkhd->bhqk", q[:, rows].to(ct), kk.to(ct)) * scale
    if bias is not None:
        s = s + (bias if bias.shape[2] == 1 else bias[:, :, rows]).to(ct)
    if causal:
        qi = torch.arange(nq, device=q.device)[rows, None] + (nk - nq)
        kj = torch.arange(nk, device=q.device)[None, :]
        s = s.masked_fill(kj > qi, float("-inf"))
    return s


def attention_with_key_mass_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_weight: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention plus per-key received mass.

    Args:
        q: ``[B, Nq, H, D]``; k: ``[B, Nk, Hkv, D]``; v: ``[B, Nk, Hkv, Dv]``.
        query_weight: ``[B, Nq]`` float weights of the queries whose attention is counted (rows sum to 1
            for a mean over the selected queries).
        attn_mask: boolean (True = attend) or additive ``[B or 1, H or 1, Nq or 1, Nk]``.
        causal: bottom-right aligned causal mask.

    Returns:
        ``out [B, Nq, H, Dv]`` in ``q.dtype`` and ``mass [B, Nk]`` float32:
        ``mass[b, j] = mean_h sum_i query_weight[b, i] * P[b, h, i, j]``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    heads, kv_heads = q.shape[2], k.shape[2]
    vv = v.repeat_interleave(heads // kv_heads, dim=2) if kv_heads != heads else v
    bias = additive_mask(attn_mask)
    outs = []
    mass = torch.zeros(k.shape[0], k.shape[1], dtype=torch.float32, device=k.device)
    weight = query_weight.float()
    for start in range(0, q.shape[1], chunk):
        rows = slice(start, min(start + chunk, q.shape[1]))
        p = torch.softmax(masked_scores(q, k, rows, scale, bias, causal), dim=-1)
        outs.append(torch.einsum("bhqk,bkhd->bqhd", p, vv.to(p.dtype)))
        mass += torch.einsum("bhqk,bq->bk", p, weight[:, rows].to(p.dtype)).float() / heads
    return torch.cat(outs, dim=1).to(q.dtype), mass
