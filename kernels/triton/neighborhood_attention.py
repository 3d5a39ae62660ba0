"""Triton kernels for neighborhood attention (1-D/2-D/3-D, dilation, causal, rpb).

Layout and tiling
-----------------
Every problem is lifted to 3 spatial dims (missing leading dims get extent 1, kernel 1).
Dilated NA is plain NA on each dilation group (positions sharing ``index % dilation`` in every
dim), so one program handles one group ``(r0, r1, r2)`` (grid axis 2) and works in *group
coordinates*; token ``(c0, c1, c2)`` of the group lives at ``(c * dilation + r)`` in memory.
Each program owns a box of ``T0 x T1 x T2`` tokens of one group (queries in the forward and
dq passes, keys in the dk/dv pass), chosen as cubic as the extents allow. The neighbourhoods of
a query box lie inside a slightly larger key box (per dim: smallest window start to largest
window end); the kernel walks that box in row-major ``BLOCK_N`` tiles with ``tl.dot`` and masks
every (query, key) pair with the exact per-dim window test. Keys are gathered by coordinates,
so the boxes need not be contiguous in memory. Masked pairs cost FLOPs (for 56x56 with a 7x7
window an 8x8 query box walks a 14x14 key box: 25% of the pairs are live), pairs outside the box
cost nothing.

Forward: online softmax (base 2) over the key tiles; only the log-sum-exp per query is stored.

Backward (no atomics anywhere, so every gradient is deterministic):

* ``_na_bwd_dq_kernel`` is query-centric like the forward and recomputes the probabilities from
  the stored log-sum-exp. With rpb it also stores ``d(logits)`` of each query's window slots
  (``[batch, heads, tokens, prod(kernel_size)]`` fp32, plain stores: each live pair is visited
  once); after the kernels, one dense contraction with per-dim one-hot maps (slot -> relative
  offset) reduces it to the rpb gradient (``_rpb_grad``). It walks the key box in half-width
  steps when rpb is on, so the bias gather and the stores fit in registers;
* ``_na_bwd_dkdv_kernel`` is key-centric: for a box of keys it walks the box of queries whose
  windows can hold them (the exact inverse neighbourhood, border-aware) in half-height steps,
  applies the same mask and accumulates ``dk`` and ``dv`` in registers.

The half steps keep every kernel spill-free at two blocks per SM on sm_90 at the ``visattn bench``
shapes (``visattn bench kernels``, tests/test_kernel_budgets.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from visattn.kernels.ops.dispatch import interpreter_enabled
from visattn.kernels.reference.neighborhood_attention import window_indices
from visattn.kernels.triton.common import (
    LOG2E,
    LOGIT_LIMIT,
    dot_precision,
    finish_softmax,
    online_softmax_step,
    pow2_block,
)


@triton.jit
def _tile_coords(pid, G0, G1, G2, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr):
    """Group coordinates of the ``pid``-th ``T0 x T1 x T2`` box of the group (row-major over boxes),
    clamped into the group, and which of them are inside it. ``pid`` must be < ``_num_tiles``."""
    nb1 = tl.cdiv(G1, T1)
    nb2 = tl.cdiv(G2, T2)
    i = tl.arange(0, T0 * T1 * T2)
    c0 = (pid // (nb1 * nb2)) * T0 + i // (T1 * T2)
    c1 = ((pid // nb2) % nb1) * T1 + (i // T2) % T1
    c2 = (pid % nb2) * T2 + i % T2
    ok = (c0 < G0) & (c1 < G1) & (c2 < G2)
    return tl.minimum(c0, G0 - 1), tl.minimum(c1, G1 - 1), tl.minimum(c2, G2 - 1), ok


@triton.jit
def _num_tiles(G0, G1, G2, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr):
    return tl.cdiv(G0, T0) * tl.cdiv(G1, T1) * tl.cdiv(G2, T2)


@triton.jit
def _box_step(start, BLOCK: tl.constexpr, lo0, lo1, lo2, E1, E2, n):
    """Coordinates ``start .. start + BLOCK`` of the row-major enumeration of the box with corner
    ``lo`` and extents ``(n / (E1 E2), E1, E2)``, and which of them are inside it."""
    offs = start + tl.arange(0, BLOCK)
    ok = offs < n
    flat = tl.minimum(offs, n - 1)
    rest = flat // E2
    return lo0 + rest // E1, lo1 + rest % E1, lo2 + flat % E2, ok


@triton.jit
def _window(g, G, K: tl.constexpr, CAUSAL: tl.constexpr):
    """Half-open window ``[start, end)`` of group coordinate ``g`` in a group of extent ``G``."""
    if CAUSAL:
        start = tl.maximum(g - (K - 1), 0)
        end = g + 1
    else:
        start = tl.minimum(tl.maximum(g - K // 2, 0), G - K)
        end = start + K
    return start, end


@triton.jit
def _inverse_window(k_min, k_max, G, K: tl.constexpr, CAUSAL: tl.constexpr):
    """Inclusive range of query coordinates whose window holds a key in ``[k_min, k_max]``.

    Non-causal windows start at ``clamp(g - K // 2, 0, G - K)``: an interior key is seen from
    ``K - 1 - K // 2`` queries before to ``K // 2`` after it, keys within ``K - 1`` of a border
    also from the clamped queries up to that border. Causal: from the key to ``K - 1`` after it.
    """
    if CAUSAL:
        lo = k_min
        hi = tl.minimum(k_max + K - 1, G - 1)
    else:
        lo = tl.where(k_min <= K - 1, 0, k_min - (K - 1 - K // 2))
        hi = tl.where(k_max >= G - K, G - 1, k_max + K // 2)
    return lo, hi


@triton.jit
def _pair_mask(qg, kg, G, K: tl.constexpr, CAUSAL: tl.constexpr):
    """``[BLOCK_M, BLOCK_N]``: key coordinate ``kg`` lies in the window of query coordinate ``qg``."""
    start, end = _window(qg, G, K, CAUSAL)
    return (kg[None, :] >= start[:, None]) & (kg[None, :] < end[:, None])


@triton.jit
def _flat(c0, c1, c2, E1: tl.constexpr, E2: tl.constexpr):
    """Row-major flat index of coordinates in a box of extents ``(., E1, E2)``."""
    return (c0 * E1 + c1) * E2 + c2


@triton.jit
def _rpb_index(qg0, qg1, qg2, kg0, kg1, kg2, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr):
    """Flat index into the ``[2K0 - 1, 2K1 - 1, 2K2 - 1]`` bias table: ``key - query + K - 1`` per dim."""
    i0 = kg0[None, :] - qg0[:, None] + (K0 - 1)
    i1 = kg1[None, :] - qg1[:, None] + (K1 - 1)
    i2 = kg2[None, :] - qg2[:, None] + (K2 - 1)
    return (i0 * (2 * K1 - 1) + i1) * (2 * K2 - 1) + i2


@triton.jit
def _group(pid_g, L0, L1, L2, DIL0, DIL1, DIL2):
    """Residues and extents of dilation group ``pid_g`` (groups enumerated row-major)."""
    r0 = pid_g // (DIL1 * DIL2)
    r1 = (pid_g // DIL2) % DIL1
    r2 = pid_g % DIL2
    return (
        r0,
        r1,
        r2,
        (L0 - r0 + DIL0 - 1) // DIL0,
        (L1 - r1 + DIL1 - 1) // DIL1,
        (L2 - r2 + DIL2 - 1) // DIL2,
    )


@triton.jit
def _tokens(c0, c1, c2, r0, r1, r2, DIL0, DIL1, DIL2, L1, L2):
    """Memory token index (row-major over the full grid) of group coordinates."""
    return ((c0 * DIL0 + r0) * L1 + c1 * DIL1 + r1) * L2 + c2 * DIL2 + r2


@triton.jit
def _logits(
    q, k, qg0, qg1, qg2, kg0, kg1, kg2, G0, G1, G2, valid, rpb_h, scale_log2,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
    HAS_RPB: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Masked logits in log2 units ``(scale * q k^T + rpb) * log2(e)``, clamped to ``+-LOGIT_LIMIT``, and
    the mask."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    mask = valid & _pair_mask(qg0, kg0, G0, K0, C0)
    mask = mask & _pair_mask(qg1, kg1, G1, K1, C1) & _pair_mask(qg2, kg2, G2, K2, C2)
    if HAS_RPB:
        ridx = _rpb_index(qg0, qg1, qg2, kg0, kg1, kg2, K0, K1, K2)
        s += tl.load(rpb_h + ridx, mask=mask, other=0.0) * LOG2E
    s = tl.minimum(tl.maximum(s, -LOGIT_LIMIT), LOGIT_LIMIT)
    return tl.where(mask, s, float("-inf")), mask


@triton.jit
def _na_fwd_kernel(
    Q, K, V, RPB, Out, LSE,
    scale_log2, L0, L1, L2, DIL0, DIL1, DIL2, H, HEAD_DIM,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
    HAS_RPB: tl.constexpr, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    BLOCK_M: tl.constexpr = T0 * T1 * T2
    pid_q, pid_bh, pid_g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    r0, r1, r2, G0, G1, G2 = _group(pid_g, L0, L1, L2, DIL0, DIL1, DIL2)
    if pid_q >= _num_tiles(G0, G1, G2, T0, T1, T2):
        return
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    n_tok = L0 * L1 * L2
    # q/k/v may be strided views (e.g. unbound from one qkv projection); outputs are contiguous.
    stride_t = H * HEAD_DIM
    base = (b * n_tok * H + h) * HEAD_DIM
    q_base = b * sqb + h * sqh
    k_base = b * skb + h * skh
    v_base = b * svb + h * svh
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    qg0, qg1, qg2, q_ok = _tile_coords(pid_q, G0, G1, G2, T0, T1, T2)
    tok_q = _tokens(qg0, qg1, qg2, r0, r1, r2, DIL0, DIL1, DIL2, L1, L2).to(tl.int64)
    q_ptrs = base + tok_q[:, None] * stride_t + offs_d[None, :]
    q_in = q_base + tok_q[:, None] * sqt + offs_d[None, :]
    q = tl.load(Q + q_in, mask=q_ok[:, None] & d_ok[None, :], other=0.0)

    s0, e0 = _window(qg0, G0, K0, C0)
    s1, e1 = _window(qg1, G1, K1, C1)
    s2, e2 = _window(qg2, G2, K2, C2)
    # The block's windows all lie in the box [lo, lo + E) of key coordinates.
    lo0, lo1, lo2 = tl.min(s0, 0), tl.min(s1, 0), tl.min(s2, 0)
    E1, E2 = tl.max(e1, 0) - lo1, tl.max(e2, 0) - lo2
    n_keys = (tl.max(e0, 0) - lo0) * E1 * E2
    rpb_h = RPB + h * ((2 * K0 - 1) * (2 * K1 - 1) * (2 * K2 - 1))

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, n_keys, BLOCK_N):
        kg0, kg1, kg2, k_ok = _box_step(start, BLOCK_N, lo0, lo1, lo2, E1, E2, n_keys)
        tok_k = _tokens(kg0, kg1, kg2, r0, r1, r2, DIL0, DIL1, DIL2, L1, L2).to(tl.int64)
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(K + k_base + tok_k[:, None] * skt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + v_base + tok_k[:, None] * svt + offs_d[None, :], mask=kv_mask, other=0.0)
        s, _ = _logits(
            q, k, qg0, qg1, qg2, kg0, kg1, kg2, G0, G1, G2, q_ok[:, None] & k_ok[None, :], rpb_h,
            scale_log2, K0, K1, K2, C0, C1, C2, HAS_RPB, PRECISION,
        )  # fmt: skip
        m_i, l_i, alpha, p = online_softmax_step(m_i, l_i, s)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)

    out, lse = finish_softmax(acc, m_i, l_i)
    tl.store(Out + q_ptrs, out.to(Out.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])
    tl.store(LSE + (b * H + h) * n_tok + tok_q, lse, mask=q_ok)


@triton.jit
def _na_bwd_dq_kernel(
    Q, K, V, RPB, DO, LSE, DELTA, DQ, DS,
    scale, scale_log2, L0, L1, L2, DIL0, DIL1, DIL2, H, HEAD_DIM,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
    HAS_RPB: tl.constexpr, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    BLOCK_M: tl.constexpr = T0 * T1 * T2
    pid_q, pid_bh, pid_g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    r0, r1, r2, G0, G1, G2 = _group(pid_g, L0, L1, L2, DIL0, DIL1, DIL2)
    if pid_q >= _num_tiles(G0, G1, G2, T0, T1, T2):
        return
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    n_tok = L0 * L1 * L2
    # q/k/v may be strided views (e.g. unbound from one qkv projection); outputs are contiguous.
    stride_t = H * HEAD_DIM
    base = (b * n_tok * H + h) * HEAD_DIM
    q_base = b * sqb + h * sqh
    k_base = b * skb + h * skh
    v_base = b * svb + h * svh
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    qg0, qg1, qg2, q_ok = _tile_coords(pid_q, G0, G1, G2, T0, T1, T2)
    tok_q = _tokens(qg0, qg1, qg2, r0, r1, r2, DIL0, DIL1, DIL2, L1, L2).to(tl.int64)
    q_ptrs = base + tok_q[:, None] * stride_t + offs_d[None, :]
    q_mask = q_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + q_base + tok_q[:, None] * sqt + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + q_ptrs, mask=q_mask, other=0.0)
    stat_ptrs = (b * H + h) * n_tok + tok_q
    lse = tl.load(LSE + stat_ptrs, mask=q_ok, other=0.0)
    delta = tl.load(DELTA + stat_ptrs, mask=q_ok, other=0.0)

    s0, e0 = _window(qg0, G0, K0, C0)
    s1, e1 = _window(qg1, G1, K1, C1)
    s2, e2 = _window(qg2, G2, K2, C2)
    # The block's windows all lie in the box [lo, lo + E) of key coordinates.
    lo0, lo1, lo2 = tl.min(s0, 0), tl.min(s1, 0), tl.min(s2, 0)
    E1, E2 = tl.max(e1, 0) - lo1, tl.max(e2, 0) - lo2
    n_keys = (tl.max(e0, 0) - lo0) * E1 * E2
    rpb_h = RPB + h * ((2 * K0 - 1) * (2 * K1 - 1) * (2 * K2 - 1))
    # with rpb, d(logits) of each query's window slots: [batch, heads, tokens, K0 * K1 * K2] fp32
    ds_bh = DS + (b * H + h) * n_tok * (K0 * K1 * K2)
    ds_rows = _tokens(qg0, qg1, qg2, r0, r1, r2, DIL0, DIL1, DIL2, L1, L2) * (K0 * K1 * K2)
    ds_rows -= _flat(s0, s1, s2, K1, K2)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, n_keys, BLOCK_N):
        kg0, kg1, kg2, k_ok = _box_step(start, BLOCK_N, lo0, lo1, lo2, E1, E2, n_keys)
        tok_k = _tokens(kg0, kg1, kg2, r0, r1, r2, DIL0, DIL1, DIL2, L1, L2).to(tl.int64)
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(K + k_base + tok_k[:, None] * skt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + v_base + tok_k[:, None] * svt + offs_d[None, :], mask=kv_mask, other=0.0)
        s, mask = _logits(
            q, k, qg0, qg1, qg2, kg0, kg1, kg2, G0, G1, G2, q_ok[:, None] & k_ok[None, :], rpb_h,
            scale_log2, K0, K1, K2, C0, C1, C2, HAS_RPB, PRECISION,
        )  # fmt: skip
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        if HAS_RPB:  # plain stores: every live (query, slot) pair is visited once
            tl.store(ds_bh + ds_rows[:, None] + _flat(kg0, kg1, kg2, K1, K2)[None, :], ds, mask=mask)
    tl.store(DQ + q_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _na_bwd_dkdv_kernel(
    Q, K, V, RPB, DO, LSE, DELTA, DK, DV,
    scale, scale_log2, L0, L1, L2, DIL0, DIL1, DIL2, H, HEAD_DIM,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
    HAS_RPB: tl.constexpr, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    BLOCK_N: tl.constexpr = T0 * T1 * T2
    pid_k, pid_bh, pid_g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    r0, r1, r2, G0, G1, G2 = _group(pid_g, L0, L1, L2, DIL0, DIL1, DIL2)
    if pid_k >= _num_tiles(G0, G1, G2, T0, T1, T2):
        return
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    n_tok = L0 * L1 * L2
    # q/k/v may be strided views (e.g. unbound from one qkv projection); outputs are contiguous.
    stride_t = H * HEAD_DIM
    base = (b * n_tok * H + h) * HEAD_DIM
    q_base = b * sqb + h * sqh
    k_base = b * skb + h * skh
    v_base = b * svb + h * svh
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    kg0, kg1, kg2, k_ok = _tile_coords(pid_k, G0, G1, G2, T0, T1, T2)
    tok_k = _tokens(kg0, kg1, kg2, r0, r1, r2, DIL0, DIL1, DIL2, L1, L2).to(tl.int64)
    kv_ptrs = base + tok_k[:, None] * stride_t + offs_d[None, :]
    kv_mask = k_ok[:, None] & d_ok[None, :]
    k = tl.load(K + k_base + tok_k[:, None] * skt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + v_base + tok_k[:, None] * svt + offs_d[None, :], mask=kv_mask, other=0.0)

    # The queries whose windows hold any of these keys form a box (inclusive bounds).
    lo0, hi0 = _inverse_window(tl.min(kg0, 0), tl.max(kg0, 0), G0, K0, C0)
    lo1, hi1 = _inverse_window(tl.min(kg1, 0), tl.max(kg1, 0), G1, K1, C1)
    lo2, hi2 = _inverse_window(tl.min(kg2, 0), tl.max(kg2, 0), G2, K2, C2)
    E1, E2 = hi1 - lo1 + 1, hi2 - lo2 + 1
    n_queries = (hi0 - lo0 + 1) * E1 * E2
    rpb_h = RPB + h * ((2 * K0 - 1) * (2 * K1 - 1) * (2 * K2 - 1))

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, n_queries, BLOCK_M):
        qg0, qg1, qg2, q_ok = _box_step(start, BLOCK_M, lo0, lo1, lo2, E1, E2, n_queries)
        tok_q = _tokens(qg0, qg1, qg2, r0, r1, r2, DIL0, DIL1, DIL2, L1, L2).to(tl.int64)
        q_ptrs = base + tok_q[:, None] * stride_t + offs_d[None, :]
        q_mask = q_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + q_base + tok_q[:, None] * sqt + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + q_ptrs, mask=q_mask, other=0.0)
        stat_ptrs = (b * H + h) * n_tok + tok_q
        lse = tl.load(LSE + stat_ptrs, mask=q_ok, other=0.0)
        delta = tl.load(DELTA + stat_ptrs, mask=q_ok, other=0.0)
        s, _ = _logits(
            q, k, qg0, qg1, qg2, kg0, kg1, kg2, G0, G1, G2, q_ok[:, None] & k_ok[None, :], rpb_h,
            scale_log2, K0, K1, K2, C0, C1, C2, HAS_RPB, PRECISION,
        )  # fmt: skip
        p = tl.exp2(s - lse[:, None])
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
    tl.store(DK + kv_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


# --------------------------------------------------------------------------- launchers


def _lift(q, kernel_size, dilation, is_causal):
    """Pad the per-dim arguments to 3 dims (leading dims of extent 1, kernel 1)."""
    spatial = tuple(q.shape[1:-2])
    pad = 3 - len(spatial)
    return (
        (1,) * pad + spatial,
        (1,) * pad + tuple(kernel_size),
        (1,) * pad + tuple(dilation),
        (False,) * pad + tuple(is_causal),
    )


def _configs(head_dim: int, dtype: torch.dtype) -> list[tuple[int, int, int, int, int]]:
    """Candidate ``(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages)``, best first; later ones need
    less shared memory (GPUs with smaller shared memory, large fp32 head dims)."""
    block_d = pow2_block(head_dim)
    if interpreter_enabled():  # big tiles, few programs: the interpreter pays per program and step
        return [(64, 64, block_d, 4, 1)]
    row_bytes = block_d * dtype.itemsize
    if row_bytes <= 128:
        first = (64, 64, block_d, 4, 3)
    elif row_bytes <= 256:
        first = (64, 32, block_d, 4, 3)
    elif row_bytes <= 512:
        first = (64, 32, block_d, 4, 2)
    else:
        first = (32, 32, block_d, 8, 2)
    return [first, (32, 32, block_d, 4, 2), (16, 16, block_d, 4, 1)]


# (kernel, dtype, BLOCK_D, has rpb, device) -> the first config that fit on that device.
_CHOSEN: dict[tuple, tuple[int, int, int, int, int]] = {}


def _launch(kernel, key: tuple, configs: list, launch) -> None:
    """``launch(config)``, falling back to the next config when one needs more resources than the GPU has
    (raised before the kernel runs, so nothing was written)."""
    key = (kernel.fn.__name__, *key)
    if key in _CHOSEN:
        launch(_CHOSEN[key])
        return
    for i, config in enumerate(configs):
        try:
            launch(config)
        except triton.runtime.errors.OutOfResources:
            if i == len(configs) - 1:
                raise
            continue
        _CHOSEN[key] = config
        return


def _tile_shape(extents: tuple[int, ...], block: int) -> tuple[int, int, int]:
    """A power-of-2 box of at most ``block`` (and at least 16) tokens that is as cubic as the group
    extents allow: its neighbourhoods overlap most, so the key box each program walks stays small."""
    tile = [1, 1, 1]
    grown = True
    while grown and math.prod(tile) < block:
        grown = False
        for d in (2, 1, 0):
            if math.prod(tile) < block and tile[d] < extents[d]:
                tile[d] *= 2
                grown = True
    while math.prod(tile) < 16:  # tl.dot needs 16 rows
        tile[2] *= 2
    return tile[0], tile[1], tile[2]


def _grid(extents: tuple[int, ...], tile: tuple[int, ...], dilation: tuple[int, ...], batch_heads: int):
    """(tiles of the largest dilation group, batch * heads, dilation groups)."""
    return (math.prod(-(-e // t) for e, t in zip(extents, tile)), batch_heads, math.prod(dilation))


def _group_extents(spatial: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(-(-n // d) for n, d in zip(spatial, dilation))


def _token_views(*tensors: torch.Tensor) -> tuple:
    """``[batch, tokens, heads, head_dim]`` views (copies only when the spatial dims cannot be merged or
    head_dim is strided) and their (batch, token, head) strides, flattened in argument order."""
    views, strides = [], []
    for t in tensors:
        batch, *spatial, heads, head_dim = t.shape
        shape = (batch, math.prod(spatial), heads, head_dim)
        if t.stride(-1) != 1:
            t = t.contiguous()
        try:
            view = t.view(shape)
        except RuntimeError:
            view = t.contiguous().view(shape)
        views.append(view)
        strides.extend(view.stride()[:3])
    return (*views, tuple(strides))


def _rpb_table(rpb: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    return q.new_zeros((1,), dtype=torch.float32) if rpb is None else rpb.float().contiguous()


def _rpb_grad(ds: torch.Tensor, rpb: torch.Tensor, spatial, kernel_size, dilation) -> torch.Tensor:
    """``d rpb`` from ``d(logits)`` in window layout ``[batch, heads, tokens, prod(kernel_size)]``
    (3-D lifted ``spatial``): one dense contraction with a one-hot ``[position, slot, 2k - 1]`` map of
    each dim's relative offsets (deterministic, no scatter)."""
    rel = [
        F.one_hot(window_indices(n, k, d, False, ds.device)[2], 2 * k - 1).to(ds.dtype)
        for n, k, d in zip(spatial, kernel_size, dilation)
    ]
    ds = ds.sum(0).view(ds.shape[1], *spatial, *kernel_size)
    return torch.einsum("hxyzuvw,xur,yvs,zwt->hrst", ds, *rel).reshape(rpb.shape).to(rpb.dtype)


def neighborhood_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rpb: torch.Tensor | None,
    kernel_size: tuple[int, ...],
    dilation: tuple[int, ...],
    is_causal: tuple[bool, ...],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward on validated arguments. Returns ``(out, lse)``: ``out`` like ``q`` (contiguous),
    ``lse`` ``[batch, heads, tokens]`` float32 in log2 units."""
    batch, heads, head_dim = q.shape[0], q.shape[-2], q.shape[-1]
    spatial, ks, dil, causal = _lift(q, kernel_size, dilation, is_causal)
    tokens = math.prod(spatial)
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    q, k, v, strides = _token_views(q, k, v)
    lse = torch.empty((batch, heads, tokens), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    rpb_table = _rpb_table(rpb, q)

    extents = _group_extents(spatial, dil)

    def launch(config):
        block_q, block_k, block_d, warps, stages = config
        tile = _tile_shape(extents, block_q)
        _na_fwd_kernel[_grid(extents, tile, dil, batch * heads)](
            q, k, v, rpb_table, out, lse,
            scale * LOG2E.value, *spatial, *dil, heads, head_dim, *strides,
            *ks, *causal, rpb is not None, *tile, block_k, block_d, dot_precision(q.dtype),
            num_warps=warps, num_stages=stages,
        )  # fmt: skip

    key = (q.dtype, triton.next_power_of_2(head_dim), rpb is not None, q.device)
    _launch(_na_fwd_kernel, key, _configs(head_dim, q.dtype), launch)
    return out, lse


def neighborhood_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rpb: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    kernel_size: tuple[int, ...],
    dilation: tuple[int, ...],
    is_causal: tuple[bool, ...],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward on validated arguments. Returns ``(dq, dk, dv, drpb)`` (``drpb`` empty without rpb)."""
    batch, heads, head_dim = q.shape[0], q.shape[-2], q.shape[-1]
    spatial, ks, dil, causal = _lift(q, kernel_size, dilation, is_causal)
    grad_out = grad_out.contiguous()
    tokens = math.prod(spatial)
    # delta_i = sum_d dO_id * O_id = sum_j P_ij dP_ij, laid out like lse.
    delta = (
        (grad_out.float() * out.float()).sum(-1).reshape(batch, tokens, heads).transpose(1, 2).contiguous()
    )
    dq, dk, dv = (torch.empty(q.shape, device=q.device, dtype=q.dtype) for _ in range(3))
    q, k, v, strides = _token_views(q, k, v)
    if q.numel() == 0:
        drpb = q.new_empty((0,)) if rpb is None else torch.zeros(rpb.shape, device=q.device, dtype=rpb.dtype)
        return dq.zero_(), dk.zero_(), dv.zero_(), drpb
    rpb_table = _rpb_table(rpb, q)
    # With rpb, dq's pass writes d(logits) per (query, window slot) [batch, heads, tokens, prod(ks)] fp32;
    # rpb is never causal, so every slot is live and written exactly once (empty, not zeros).
    ds = rpb_table
    if rpb is not None:
        ds = torch.empty((batch, heads, tokens, math.prod(ks)), device=q.device, dtype=torch.float32)
    fixed = (
        scale,
        scale * LOG2E.value,
        *spatial,
        *dil,
        heads,
        head_dim,
        *strides,
        *ks,
        *causal,
        rpb is not None,
    )

    extents = _group_extents(spatial, dil)

    def launch_dq(config):
        block_q, block_k, block_d, warps, stages = config
        if rpb is not None:  # the bias gather and d(logits) stores: half-width key steps, no spill
            block_k = max(16, block_k // 2)
        tile = _tile_shape(extents, block_q)
        _na_bwd_dq_kernel[_grid(extents, tile, dil, batch * heads)](
            q, k, v, rpb_table, grad_out, lse, delta, dq, ds,
            *fixed, *tile, block_k, block_d, dot_precision(q.dtype),
            num_warps=warps, num_stages=stages,
        )  # fmt: skip

    def launch_dkdv(config):
        block_q, block_k, block_d, warps, stages = config
        block_q = max(16, block_q // 2)  # dk and dv stay live over the walk: half-height query steps
        tile = _tile_shape(extents, block_k)
        _na_bwd_dkdv_kernel[_grid(extents, tile, dil, batch * heads)](
            q, k, v, rpb_table, grad_out, lse, delta, dk, dv,
            *fixed, *tile, block_q, block_d, dot_precision(q.dtype),
            num_warps=warps, num_stages=stages,
        )  # fmt: skip

    key = (q.dtype, triton.next_power_of_2(head_dim), rpb is not None, q.device)
    configs = _configs(head_dim, q.dtype)
    _launch(_na_bwd_dq_kernel, key, configs, launch_dq)
    _launch(_na_bwd_dkdv_kernel, key, configs, launch_dkdv)
    drpb = q.new_empty((0,)) if rpb is None else _rpb_grad(ds, rpb, spatial, ks, dil)
    return dq, dk, dv, drpb
