"""Attention that also returns the attention mass each key received (FastV / VTC-CLS style scoring).

``out = softmax(q k^T * scale + mask) v`` as usual, plus for every key ``j``::

    mass[b, j] = mean over heads h of  sum_i w[b, i] * P[b, h, i, j]

where ``w`` selects the queries whose attention counts: ``query_set="all"`` (mean over all queries,
the FastV paper's "average attention received"), ``"last"`` (the last query only, what the official
FastV code ranks by), or a boolean ``[B, Nq]`` tensor (mean over the marked queries, e.g. the text
tokens). The Triton backend is flash-style (online softmax, then a second pass over the selected
queries using the stored log-sum-exp); neither backend materialises the ``[Nq, Nk]`` matrix of all
queries. ``backend="auto"`` with only a short suffix of selected queries (``"last"``: FastV's
official scoring) takes the output from ``torch.nn.functional.scaled_dot_product_attention`` (its
flash/cuDNN kernels) and scores those few rows directly, so scoring costs about one SDPA call.
Forward only: no method trains through this op.
"""

from __future__ import annotations

import torch

from visattn.kernels.ops._checks import MAX_SDPA_SCALE, check_float_tensors, check_ndim, softmax_scale
from visattn.kernels.ops._dispatch import resolve_backend, triton_limit
from visattn.kernels.reference.attention_with_key_mass import (
    additive_mask,
    attention_with_key_mass_reference,
    live_rows,
    masked_scores,
    masked_softmax,
)

OP = "attention_with_key_mass"
QUERY_SETS = ("all", "last")


def validate_attention_args(op, q, k, v, attn_mask, causal, scale) -> float:
    """Shared checks of ``[B, N, H, D]`` q/k/v (GQA allowed), mask and scale; returns the scale."""
    check_float_tensors(op, q=q, k=k, v=v)
    check_ndim(op, "q", q, (4,), "[batch, tokens, heads, head_dim]")
    check_ndim(op, "k", k, (4,), "[batch, kv_tokens, kv_heads, head_dim]")
    check_ndim(op, "v", v, (4,), "[batch, kv_tokens, kv_heads, v_head_dim]")
    batch, nq, heads, dim = q.shape
    if k.shape[0] != batch or k.shape[3] != dim or k.shape[2] == 0 or heads % k.shape[2] != 0:
        raise ValueError(
            f"{op}: k must be [batch={batch}, kv_tokens, kv_heads, head_dim={dim}] with heads={heads} a "
            f"multiple of kv_heads, got {tuple(k.shape)}"
        )
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"{op}: v must share k's first three dims {tuple(k.shape[:3])}, got {tuple(v.shape)}"
        )
    nk = k.shape[1]
    if min(nq, nk, dim, v.shape[3]) == 0:
        raise ValueError(f"{op}: empty input: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not isinstance(causal, bool):
        raise ValueError(f"{op}: causal must be a bool, got {causal!r}")
    if causal and nk < nq:
        raise ValueError(f"{op}: causal attention needs kv_tokens >= tokens, got {nk} < {nq}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor) or attn_mask.ndim != 4:
            raise ValueError(
                f"{op}: attn_mask must be a 4-D tensor [batch or 1, heads or 1, {nq} or 1, {nk}]"
            )
        b, h, mq, mk = attn_mask.shape
        if b not in (1, batch) or h not in (1, heads) or mq not in (1, nq) or mk != nk:
            raise ValueError(
                f"{op}: attn_mask must have shape [batch or 1, heads or 1, {nq} or 1, {nk}] (1: the same "
                f"row for every query, e.g. key padding), got {tuple(attn_mask.shape)}"
            )
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise ValueError(
                f"{op}: attn_mask must be bool (True = attend) or float (additive), got {attn_mask.dtype}"
            )
        if attn_mask.device != q.device:
            raise ValueError(f"{op}: attn_mask is on {attn_mask.device} but q is on {q.device}")
    return softmax_scale(op, scale, dim)


def query_weights(op: str, query_set, batch: int, nq: int, device: torch.device) -> torch.Tensor:
    """``[B, Nq]`` float32 weights: a mean over the selected queries."""
    if isinstance(query_set, str):
        if query_set not in QUERY_SETS:
            raise ValueError(
                f"{op}: query_set must be one of {QUERY_SETS} or a bool [batch, tokens] tensor, "
                f"got {query_set!r}"
            )
        w = torch.zeros(batch, nq, dtype=torch.float32, device=device)
        if query_set == "all":
            w += 1.0 / nq
        else:
            w[:, -1] = 1.0
        return w
    if (
        not isinstance(query_set, torch.Tensor)
        or query_set.dtype != torch.bool
        or tuple(query_set.shape)
        != (
            batch,
            nq,
        )
    ):
        got = tuple(query_set.shape) if isinstance(query_set, torch.Tensor) else type(query_set).__name__
        raise ValueError(f"{op}: a query_set tensor must be bool of shape [{batch}, {nq}], got {got}")
    w = query_set.to(device=device, dtype=torch.float32)
    return w / w.sum(dim=1, keepdim=True).clamp_min(1.0)


MODE_REFERENCE, MODE_TRITON, MODE_SDPA_SUFFIX = 0, 1, 2
SUFFIX_ROWS = 128  # auto: at most this many trailing selected queries -> SDPA output + dense suffix rows


def sdpa_with_suffix_mass(q, k, v, query_weight, bias, causal, scale, q_lo):
    """Output from ``scaled_dot_product_attention`` (flash/cuDNN kernels where they apply) and the mass
    of the selected queries, which all lie in the short suffix ``q_lo:``, from those rows alone:
    ``O((Nq - q_lo) * Nk)`` extra work. ``bias``: additive float32 or None."""
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


@torch.library.custom_op("visattn::attention_with_key_mass", mutates_args=())
def _key_mass_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_weight: torch.Tensor,
    bias: torch.Tensor | None,
    causal: bool,
    scale: float,
    q_lo: int,
    mode: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    if mode == MODE_TRITON:
        from visattn.kernels.triton.attention_with_key_mass import attention_with_key_mass_triton

        return attention_with_key_mass_triton(q, k, v, query_weight, bias, causal, scale, q_lo)
    if mode == MODE_SDPA_SUFFIX:
        return sdpa_with_suffix_mass(q, k, v, query_weight, bias, causal, scale, q_lo)
    return attention_with_key_mass_reference(q, k, v, query_weight, bias, causal, scale)


@_key_mass_op.register_fake
def _(q, k, v, query_weight, bias, causal, scale, q_lo, mode):
    out = q.new_empty(*q.shape[:3], v.shape[3])
    return out, q.new_empty(k.shape[0], k.shape[1], dtype=torch.float32)


def attention_with_key_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    query_set: str | torch.Tensor = "all",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and the head-averaged attention mass each key received.

    Args:
        q: ``[B, Nq, H, D]``; k: ``[B, Nk, Hkv, D]``; v: ``[B, Nk, Hkv, Dv]`` (``H`` a multiple of ``Hkv``).
        attn_mask: bool (True = attend) or additive float, ``[B or 1, H or 1, Nq or 1, Nk]`` (a single
            row applies to every query: key padding, combined with ``causal`` when set).
        causal: causal mask aligned bottom-right (queries are the last ``Nq`` of the ``Nk`` positions).
        scale: default ``D ** -0.5``.
        query_set: ``"all"``, ``"last"`` or a bool ``[B, Nq]`` tensor of the queries to count.
        backend: ``"auto"`` (a short suffix of selected queries: ``"torch"``; else Triton on CUDA,
            ``"torch"`` elsewhere), ``"triton"``, ``"torch"`` (SDPA output + the selected rows scored
            directly when they are a suffix of at most ``SUFFIX_ROWS`` = 128 queries and ``scale`` is at most
            ``MAX_SDPA_SCALE``, else the reference)
            or ``"reference"``.

    Returns:
        ``out [B, Nq, H, Dv]`` (dtype of q) and ``mass [B, Nk]`` float32, the mean over the selected
        queries and over heads of the attention probabilities (sums to 1 over keys). A (head, query) row
        whose keys are all masked (bool False, additive ``-inf`` or causality) has a zero output and
        gives no mass, on every backend, so the mass then sums to the share of live rows.
    """
    scale = validate_attention_args(OP, q, k, v, attn_mask, causal, scale)
    which = resolve_backend(backend, q, k, v, op=OP, limit=triton_limit(q.dtype))
    weight = query_weights(OP, query_set, q.shape[0], q.shape[1], q.device)
    nz = weight.sum(0).nonzero()
    q_lo = int(nz[0]) if nz.numel() else q.shape[1]
    bias = additive_mask(attn_mask)
    if backend in ("auto", "torch") and q.shape[1] - q_lo <= SUFFIX_ROWS and scale <= MAX_SDPA_SCALE:
        mode = MODE_SDPA_SUFFIX
    else:
        mode = MODE_TRITON if which == "triton" else MODE_REFERENCE
    return _key_mass_op(q, k, v, weight, bias, causal, scale, q_lo, mode)
