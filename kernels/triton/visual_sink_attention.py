"""Triton forward of VAR's visual-sink redistribution fused into one attention pass.

One online softmax over the key blocks keeps three output accumulators (sink keys, non-sink image
keys, other keys) and the probability mass of text sinks, visual sinks and non-sink image keys.
After the last block the row knows whether it is image-centric and what budget the sinks give up,
so the output is recombined as ``O_other + s * O_sink + (1 + g) * O_visual`` without ever forming
the attention matrix.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from visattn.kernels.triton.common import (
    attention_logits,
    dot_precision,
    finish_softmax,
    load_tile,
    online_softmax_step,
    pow2_block,
)


@triton.jit
def _visual_sink_fwd(
    Q, K, V, Bias, Cat, QMask, Out,
    sqb, sqn, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd,
    sbb, sbh, sbq, sbk, sob, son, soh, sod,
    NQ, NK, H, GROUP, D, DV, scale, fraction, rho, min_image,
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
    l_tsink = tl.zeros([BLOCK_M], tl.float32)
    l_vsink = tl.zeros([BLOCK_M], tl.float32)
    l_vis = tl.zeros([BLOCK_M], tl.float32)
    acc_other = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    acc_sink = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    acc_vis = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < NK
        k = load_tile(K + b * skb + hk * skh, offs_n, offs_d, skn, skd, n_ok, D)
        s = attention_logits(
            q, k, Bias + b * sbb + h * sbh, offs_m, offs_n, m_ok, n_ok, sbq, sbk, scale, NQ, NK,
            HAS_BIAS, CAUSAL, PRECISION,
        )  # fmt: skip
        m_i, l_i, alpha, p = online_softmax_step(m_i, l_i, s)
        cat = tl.load(Cat + b * NK + offs_n, mask=n_ok, other=0)
        is_tsink = (cat == 1)[None, :]
        is_vsink = (cat == 2)[None, :]
        is_vis = (cat == 3)[None, :]
        p_sink = tl.where(is_tsink | is_vsink, p, 0.0)
        p_vis = tl.where(is_vis, p, 0.0)
        p_other = p - p_sink - p_vis
        l_tsink = l_tsink * alpha + tl.sum(tl.where(is_tsink, p, 0.0), 1)
        l_vsink = l_vsink * alpha + tl.sum(tl.where(is_vsink, p, 0.0), 1)
        l_vis = l_vis * alpha + tl.sum(p_vis, 1)
        v = load_tile(V + b * svb + hk * svh, offs_n, offs_dv, svn, svd, n_ok, DV)
        acc_other = acc_other * alpha[:, None] + tl.dot(p_other.to(v.dtype), v, input_precision=PRECISION)
        acc_sink = acc_sink * alpha[:, None] + tl.dot(p_sink.to(v.dtype), v, input_precision=PRECISION)
        acc_vis = acc_vis * alpha[:, None] + tl.dot(p_vis.to(v.dtype), v, input_precision=PRECISION)
    o_other, _ = finish_softmax(acc_other, m_i, l_i)
    o_sink, _ = finish_softmax(acc_sink, m_i, l_i)
    o_vis, _ = finish_softmax(acc_vis, m_i, l_i)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    a_sink = (l_tsink + l_vsink) / l_safe
    a_vns = l_vis / l_safe
    a_img = a_vns + l_vsink / l_safe
    qm = tl.load(QMask + b * NQ + offs_m, mask=m_ok, other=0)
    chosen = (qm != 0) & (a_img >= min_image) & (a_vns >= rho * a_img) & (a_vns > 0.0)
    gain = tl.where(chosen, fraction * a_sink / tl.where(a_vns > 0.0, a_vns, 1.0), 0.0)
    keep = tl.where(chosen, 1.0 - fraction, 1.0)
    out = o_other + keep[:, None] * o_sink + (1.0 + gain[:, None]) * o_vis
    tl.store(
        Out + b * sob + h * soh + offs_m[:, None] * son + offs_dv[None, :] * sod,
        out.to(Out.dtype.element_ty),
        mask=m_ok[:, None] & (offs_dv[None, :] < DV),
    )


def visual_sink_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    category: torch.Tensor,
    query_mask: torch.Tensor,
    fraction: float,
    rho: float,
    min_image_attention: float,
    bias: torch.Tensor | None,
    causal: bool,
    scale: float,
) -> torch.Tensor:
    """Launch the fused kernel; ``bias`` additive float32 ``[B or 1, H or 1, Nq or 1, Nk]`` or None."""
    batch, nq, heads, dim = q.shape
    nk, kv_heads, dv = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty(batch, nq, heads, dv, dtype=q.dtype, device=q.device)
    bd, bdv = pow2_block(dim), pow2_block(dv)
    # three [BLOCK_M, BLOCK_DV] fp32 accumulators: 32-row query tiles keep them in registers at head dim 128
    bm, bn = (64, 64) if max(bd, bdv) < 128 else (32, 64) if max(bd, bdv) == 128 else (32, 32)
    sb = (
        (0, 0, 0, 0) if bias is None else tuple(0 if bias.shape[i] == 1 else bias.stride(i) for i in range(4))
    )
    cat = category.to(torch.int8).contiguous()
    qmask = query_mask.to(torch.int8).contiguous()
    _visual_sink_fwd[(triton.cdiv(nq, bm), batch * heads)](
        q, k, v, bias if bias is not None else q, cat, qmask, out,
        *q.stride(), *k.stride(), *v.stride(), *sb, *out.stride(),
        nq, nk, heads, heads // kv_heads, dim, dv, scale, fraction, rho, min_image_attention,
        HAS_BIAS=bias is not None, CAUSAL=causal, PRECISION=dot_precision(q.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv,
    )  # fmt: skip
    return out
