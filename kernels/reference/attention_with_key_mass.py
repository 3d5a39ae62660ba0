"""PyTorch reference of attention that also returns the attention mass each key received.

Readable ground truth for :func:`visattn.kernels.attention_with_key_mass`. It never holds the full
``[Nq, Nk]`` score matrix of all heads at once: queries are processed in chunks of ``chunk`` rows.

Masking, the same on every backend: a key is masked for a query when a bool mask says False, an
additive mask holds ``-inf`` or causality excludes it. A (head, query) row whose keys are all masked
gets a zero output and gives no attention mass. Logits of unmasked keys are clamped to
``[-LOGIT_LIMIT, LOGIT_LIMIT]`` after the additive mask, so a huge ``scale`` or a ``finfo.min`` mask
never turns into ``inf - inf``.
"""

from __future__ import annotations

import torch

from visattn.kernels.ops.checks import LOGIT_LIMIT


def additive_mask(attn_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Turn a boolean (True = attend) or additive float mask into an additive float32 mask (masked: -inf)."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=torch.float32, device=attn_mask.device)
        return torch.where(attn_mask, zero, float("-inf"))
    return attn_mask.float()


def masked_softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim; a row whose entries are all ``-inf`` (every key masked) is all zeros."""
    live = scores.amax(-1, keepdim=True) > float("-inf")
    return torch.softmax(scores.masked_fill(~live, 0.0), dim=-1) * live


def live_rows(bias: torch.Tensor | None, causal: bool, nq: int, nk: int) -> torch.Tensor | None:
    """``[B or 1, H or 1, Nq or 1]`` bool: rows with at least one unmasked key (None: every row).

    Causal rows see keys ``j <= i + Nk - Nq``, so a row is live when its first unmasked key is there."""
    if bias is None:
        return None  # causal alone always leaves key 0 (Nk >= Nq)
    allowed = bias > float("-inf")
    first = torch.where(allowed.any(-1), allowed.to(torch.uint8).argmax(-1), nk)
    if not causal:
        return first < nk
    return first <= torch.arange(nq, device=bias.device) + (nk - nq)


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
    masked = None
    if bias is not None:
        b = (bias if bias.shape[2] == 1 else bias[:, :, rows]).to(ct)
        s = s + b
        masked = b == float("-inf")
    s = s.clamp(-LOGIT_LIMIT, LOGIT_LIMIT)
    if causal:
        qi = torch.arange(nq, device=q.device)[rows, None] + (nk - nq)
        kj = torch.arange(nk, device=q.device)[None, :]
        masked = kj > qi if masked is None else masked | (kj > qi)
    return s if masked is None else s.masked_fill(masked, float("-inf"))


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
        ``mass[b, j] = mean_h sum_i query_weight[b, i] * P[b, h, i, j]`` (``P`` zero on fully masked rows).
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
        p = masked_softmax(masked_scores(q, k, rows, scale, bias, causal))
        outs.append(torch.einsum("bhqk,bkhd->bqhd", p, vv.to(p.dtype)))
        mass += torch.einsum("bhqk,bq->bk", p, weight[:, rows].to(p.dtype)).float() / heads
    return torch.cat(outs, dim=1).to(q.dtype), mass
