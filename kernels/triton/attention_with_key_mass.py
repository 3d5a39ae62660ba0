"""Triton forward of attention with per-key received mass (flash-style, no ``[Nq, Nk]`` matrix).

Two kernels:

1. ``_key_mass_fwd``: online-softmax attention over key blocks (the shared base-2 blocks of
   ``_common``); writes the output, the row max ``m[b, h, i]`` (log2 units) and the inverse row sum
   ``1 / l`` (both 0 on a fully masked row). They are kept apart rather than as one log-sum-exp so that
   saturated logits (``+-LOGIT_LIMIT``) still give probabilities that sum to one.
2. ``_key_mass_accumulate``: one program per (key block, batch) recomputes the scores of the selected
   queries against its keys, turns them into probabilities ``exp2(s - m) / l`` and sums
   ``query_weight[i] * P[h, i, j]`` over queries and heads. Queries before ``q_lo`` have zero weight
   and are skipped, so ranking by the last query costs one query block per key block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from visattn.kernels.triton.common import (
    attention_logits,
    broadcast_strides,
    dot_precision,
    finish_softmax,
    load_tile,
    online_softmax_step,
    pow2_block,
)


@triton.jit
def _key_mass_fwd(
    Q, K, V, Bias, Out, RowMax, RowInv,
    sqb, sqn, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd,
    sbb, sbh, sbq, sbk, sob, son, soh, sod,
    NQ, NK, H, GROUP, D, DV, scale,
    HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < NQ
    q = load_tile(Q + b * sqb + h * sqh, offs_m, offs_d, sqn, sqd, m_ok, D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < NK
        k = load_tile(K + b * skb + hk * skh, offs_n, offs_d, skn, skd, n_ok, D)
        s = attention_logits(
            q, k, Bias + b * sbb + h * sbh, offs_m, offs_n, m_ok, n_ok, sbq, sbk, scale, NQ, NK,
            HAS_BIAS, CAUSAL, PRECISION,
        )  # fmt: skip
        m_i, l_i, alpha, p = online_softmax_step(m_i, l_i, s)
        v = load_tile(V + b * svb + hk * svh, offs_n, offs_dv, svn, svd, n_ok, DV)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    out, _ = finish_softmax(acc, m_i, l_i)
    tl.store(
        Out + b * sob + h * soh + offs_m[:, None] * son + offs_dv[None, :] * sod,
        out.to(Out.dtype.element_ty),
        mask=m_ok[:, None] & (offs_dv[None, :] < DV),
    )
    tl.store(RowMax + (b * H + h) * NQ + offs_m, tl.where(m_i == float("-inf"), 0.0, m_i), mask=m_ok)
    tl.store(RowInv + (b * H + h) * NQ + offs_m, tl.where(l_i == 0.0, 0.0, 1.0 / l_i), mask=m_ok)


@triton.jit
def _key_mass_accumulate(
    Q, K, Bias, RowMax, RowInv, W, Mass,
    sqb, sqn, sqh, sqd, skb, skn, skh, skd, sbb, sbh, sbq, sbk,
    NQ, NK, H, GROUP, D, scale, q_lo,
    HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < NK
    acc = tl.zeros([BLOCK_N], tl.float32)
    m_start = (q_lo // BLOCK_M) * BLOCK_M
    for h in range(0, H):
        hk = h // GROUP
        k = load_tile(K + b * skb + hk * skh, offs_n, offs_d, skn, skd, n_ok, D)
        for start_m in range(m_start, NQ, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < NQ
            q = load_tile(Q + b * sqb + h * sqh, offs_m, offs_d, sqn, sqd, m_ok, D)
            s = attention_logits(
                q, k, Bias + b * sbb + h * sbh, offs_m, offs_n, m_ok, n_ok, sbq, sbk, scale, NQ, NK,
                HAS_BIAS, CAUSAL, PRECISION,
            )  # fmt: skip
            row = (b * H + h) * NQ + offs_m
            m = tl.load(RowMax + row, mask=m_ok, other=0.0)
            # query weight / row sum; zero on rows past NQ and on fully masked rows (1 / l stored as 0)
            w = tl.load(W + b * NQ + offs_m, mask=m_ok, other=0.0) * tl.load(
                RowInv + row, mask=m_ok, other=0.0
            )
            acc += tl.sum(tl.exp2(s - m[:, None]) * w[:, None], 0)
    tl.store(Mass + b * NK + offs_n, acc / H, mask=n_ok)


def attention_with_key_mass_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_weight: torch.Tensor,
    bias: torch.Tensor | None,
    causal: bool,
    scale: float,
    q_lo: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch both kernels. ``bias``: additive float32 ``[B or 1, H or 1, Nq or 1, Nk]`` or None;
    ``query_weight``: ``[B, Nq]`` float32, zero before ``q_lo``. Returns ``(out, mass)``."""
    batch, nq, heads, dim = q.shape
    nk, kv_heads, dv = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty(batch, nq, heads, dv, dtype=q.dtype, device=q.device)
    row_max, row_inv = (torch.empty(batch, heads, nq, dtype=torch.float32, device=q.device) for _ in range(2))
    mass = torch.empty(batch, nk, dtype=torch.float32, device=q.device)
    weight = query_weight.float().contiguous()
    bd, bdv = pow2_block(dim), pow2_block(dv)
    bm = bn = 64 if max(bd, bdv) <= 128 else 32
    prec = dot_precision(q.dtype)
    sb = broadcast_strides(bias)
    bias_arg = bias if bias is not None else q
    group = heads // kv_heads
    _key_mass_fwd[(triton.cdiv(nq, bm), batch * heads)](
        q, k, v, bias_arg, out, row_max, row_inv,
        *q.stride(), *k.stride(), *v.stride(), *sb, *out.stride(),
        nq, nk, heads, group, dim, dv, scale,
        HAS_BIAS=bias is not None, CAUSAL=causal, PRECISION=prec,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv,
        # with a bias tile, three pipeline stages at head dim 128 need 144 KB: one block per SM
        num_stages=2 if bias is not None and max(bd, bdv) >= 128 else 3,
    )  # fmt: skip
    _key_mass_accumulate[(triton.cdiv(nk, bn), batch)](
        q, k, bias_arg, row_max, row_inv, weight, mass,
        *q.stride(), *k.stride(), *sb,
        nq, nk, heads, group, dim, scale, q_lo,
        HAS_BIAS=bias is not None, CAUSAL=causal, PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
    )  # fmt: skip
    return out, mass
