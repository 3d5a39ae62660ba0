"""``attention_with_key_mass``'s ``torch`` backend: SDPA's output plus the mass of a short query suffix.

When the selected queries are the last few (FastV's official scoring ranks by the last query), the
output comes from ``torch.nn.functional.scaled_dot_product_attention`` (flash / cuDNN kernels where they
apply) and only the selected rows are scored densely: about one SDPA call. Other query sets, and scales
above ``MAX_SDPA_SCALE``, run the chunked reference.
"""

from __future__ import annotations

import torch

from visattn.kernels.ops.checks import MAX_SDPA_SCALE
from visattn.kernels.reference.attention_with_key_mass import (
    attention_with_key_mass_reference,
    live_rows,
    masked_scores,
    masked_softmax,
)

SUFFIX_ROWS = 128  # at most this many trailing selected queries -> SDPA output + dense suffix rows


def suffix_path_applies(nq: int, q_lo: int, scale: float) -> bool:
    """True when the selected queries ``q_lo:`` of ``nq`` are few enough (and the scale small enough) for
    :func:`sdpa_with_suffix_mass`."""
    return nq - q_lo <= SUFFIX_ROWS and scale <= MAX_SDPA_SCALE


def sdpa_with_suffix_mass(q, k, v, query_weight, bias, causal, scale, q_lo):
    """Output from SDPA and the mass of the selected queries, which all lie in the suffix ``q_lo:``, from
    those rows alone: ``O((Nq - q_lo) * Nk)`` extra work. Shapes as :func:`attention_with_key_mass_torch`."""
    nq, nk, heads, kv_heads = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    mask = None if bias is None else bias.to(q.dtype).clamp_min(torch.finfo(q.dtype).min)
    if causal and (mask is not None or nq != nk):
        allowed = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
        causal_bias = torch.zeros(nq, nk, dtype=q.dtype, device=q.device).masked_fill(
            ~allowed, torch.finfo(q.dtype).min
        )
        mask = causal_bias if mask is None else (mask + causal_bias).clamp_min(torch.finfo(q.dtype).min)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        is_causal=causal and mask is None, scale=scale, enable_gqa=kv_heads != heads,
    ).transpose(1, 2)  # fmt: skip
    live = live_rows(bias, causal, nq, nk)
    if live is not None:  # SDPA spreads a fully masked row evenly: such rows are zero here
        out = out * live.expand(-1, heads, nq).transpose(1, 2)[..., None].to(out.dtype)
    rows = slice(q_lo, nq)
    p = masked_softmax(masked_scores(q, k, rows, scale, bias, causal))
    mass = torch.einsum("bhqk,bq->bk", p, query_weight[:, rows].to(p.dtype)).float() / heads
    return out.contiguous(), mass


def attention_with_key_mass_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_weight: torch.Tensor,
    bias: torch.Tensor | None,
    causal: bool,
    scale: float,
    q_lo: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [B, Nq, H, D]``, ``k [B, Nk, Hkv, D]``, ``v [B, Nk, Hkv, Dv]``, ``query_weight [B, Nq]`` (zero
    before ``q_lo``), ``bias`` additive float32 ``[B or 1, H or 1, Nq or 1, Nk]`` or None; returns
    ``out [B, Nq, H, Dv]`` and ``mass [B, Nk]`` float32."""
    if suffix_path_applies(q.shape[1], q_lo, scale):
        return sdpa_with_suffix_mass(q, k, v, query_weight, bias, causal, scale, q_lo)
    return attention_with_key_mass_reference(q, k, v, query_weight, bias, causal, scale)
