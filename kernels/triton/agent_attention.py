"""Triton kernels of agent attention (see :mod:`visattn.kernels.ops.agent_attention` for the maths).

Forward, two kernels:

1. ``_aggregate_fwd``, one program per (batch, head) and key split: the agent tile (``A <= 256``
   rows) stays in registers while the program streams over its keys/values with an online softmax
   per agent row, producing ``agent_v [B, H, A, Dv]`` (float32) and its log-sum-exp. With few
   (batch, head) pairs the keys are split over several programs (flash-decoding style) and the
   partial softmaxes merged by their log-sum-exps.
2. ``_broadcast_fwd``, one program per (batch, head, query tile): scores against all agents fit one
   block, so the softmax is exact in one pass; the output is ``p @ agent_v``.

Neither the ``A x Nk`` nor the ``Nq x A`` probability matrix is written to memory. The backward
recomputes them from the stored log-sum-exps: ``_broadcast_bwd`` (dq, and partial d_agent /
d_agent_v per split of the query tiles) then ``_aggregate_bwd`` (dk, dv, and partial d_agent per
split of the key tiles). Bias gradients, when biases are given, are the score gradients themselves,
written per batch and summed over a broadcast batch dim on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from visattn.kernels.triton.common import (
    LOG2E,
    broadcast_strides,
    dot_precision,
    finish_softmax,
    load_tile,
    online_softmax_step,
    pow2_block,
)


@triton.jit
def _aggregate_fwd(
    Agent,
    K,
    V,
    Bias,
    AgentV,
    Lse,
    sab,
    saa,
    sah,
    sad,
    skb,
    skn,
    skh,
    skd,
    svb,
    svn,
    svh,
    svd,
    sbb,
    sbh,
    sba,
    sbn,
    H,
    A,
    N,
    D,
    DV,
    BH,
    scale,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // H
    h = pid % H
    offs_a = tl.arange(0, BLOCK_A)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)
    mask_a = offs_a < A
    agent = load_tile(Agent + b * sab + h * sah, offs_a, offs_d, saa, sad, mask_a, D)
    agent = (agent * scale).to(agent.dtype)
    m_i = tl.full([BLOCK_A], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_A], tl.float32)
    acc = tl.zeros([BLOCK_A, BLOCK_DV], tl.float32)
    for tile in range(split, tl.cdiv(N, BLOCK_N), tl.num_programs(1)):
        n = tile * BLOCK_N + offs_n
        mask_n = n < N
        kt = tl.load(
            K + b * skb + h * skh + n[None, :] * skn + offs_d[:, None] * skd,
            mask=mask_n[None, :] & (offs_d[:, None] < D),
            other=0.0,
        )
        s = tl.dot(agent, kt, input_precision=PRECISION)
        if HAS_BIAS:
            s += load_tile(Bias + b * sbb + h * sbh, offs_a, n, sba, sbn, mask_a, N).to(tl.float32)
        s = tl.where(mask_n[None, :], s * LOG2E, float("-inf"))
        m_i, l_i, alpha, p = online_softmax_step(m_i, l_i, s)
        v = load_tile(V + b * svb + h * svh, n, offs_dv, svn, svd, mask_n, DV)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    out, lse = finish_softmax(acc, m_i, l_i)
    row = (split * BH + pid) * A + offs_a
    tl.store(
        AgentV + row[:, None] * DV + offs_dv[None, :], out, mask=mask_a[:, None] & (offs_dv[None, :] < DV)
    )
    tl.store(Lse + row, lse, mask=mask_a)


@triton.jit
def _broadcast_fwd(
    Q,
    Agent,
    AgentV,
    Bias,
    Out,
    Lse,
    sqb,
    sqn,
    sqh,
    sqd,
    sab,
    saa,
    sah,
    sad,
    sbb,
    sbh,
    sbn,
    sba,
    sob,
    son,
    soh,
    sod,
    H,
    A,
    N,
    D,
    DV,
    scale,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_a = tl.arange(0, BLOCK_A)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < N
    mask_a = offs_a < A
    q = load_tile(Q + b * sqb + h * sqh, offs_m, offs_d, sqn, sqd, mask_m, D)
    q = (q * scale).to(q.dtype)
    agent_t = tl.load(
        Agent + b * sab + h * sah + offs_a[None, :] * saa + offs_d[:, None] * sad,
        mask=mask_a[None, :] & (offs_d[:, None] < D),
        other=0.0,
    )
    s = tl.dot(q, agent_t, input_precision=PRECISION)
    if HAS_BIAS:
        s += load_tile(Bias + b * sbb + h * sbh, offs_m, offs_a, sbn, sba, mask_m, A).to(tl.float32)
    s = tl.where(mask_a[None, :], s * LOG2E, float("-inf"))
    m_i, l_i, _, p = online_softmax_step(
        tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32), s
    )
    agent_v = tl.load(
        AgentV + (pid * A + offs_a[:, None]) * DV + offs_dv[None, :],
        mask=mask_a[:, None] & (offs_dv[None, :] < DV),
        other=0.0,
    )
    acc = tl.dot(p.to(q.dtype), agent_v.to(q.dtype), input_precision=PRECISION)
    out, lse = finish_softmax(acc, m_i, l_i)
    tl.store(
        Out + b * sob + h * soh + offs_m[:, None] * son + offs_dv[None, :] * sod,
        out.to(Out.dtype.element_ty),
        mask=mask_m[:, None] & (offs_dv[None, :] < DV),
    )
    tl.store(Lse + pid * N + offs_m, lse, mask=mask_m)


@triton.jit
def _broadcast_bwd(
    Q,
    Agent,
    AgentV,
    Bias,
    Out,
    DOut,
    Lse,
    DQ,
    DBias,
    DAgentPart,
    DAgentVPart,
    sqb,
    sqn,
    sqh,
    sqd,
    sab,
    saa,
    sah,
    sad,
    sbb,
    sbh,
    sbn,
    sba,
    sob,
    son,
    soh,
    sod,
    sdob,
    sdon,
    sdoh,
    sdod,
    sdqb,
    sdqn,
    sdqh,
    sdqd,
    H,
    A,
    N,
    D,
    DV,
    BH,
    scale,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    b = pid // H
    h = pid % H
    offs_a = tl.arange(0, BLOCK_A)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_a = offs_a < A
    mask_d = offs_d < D
    mask_dv = offs_dv < DV
    agent = load_tile(Agent + b * sab + h * sah, offs_a, offs_d, saa, sad, mask_a, D)
    agent_v = tl.load(
        AgentV + (pid * A + offs_a[:, None]) * DV + offs_dv[None, :],
        mask=mask_a[:, None] & mask_dv[None, :],
        other=0.0,
    ).to(agent.dtype)
    d_agent = tl.zeros([BLOCK_A, BLOCK_D], tl.float32)
    d_agent_v = tl.zeros([BLOCK_A, BLOCK_DV], tl.float32)
    for tile in range(split, tl.cdiv(N, BLOCK_M), splits):
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        q = load_tile(Q + b * sqb + h * sqh, offs_m, offs_d, sqn, sqd, mask_m, D)
        qs = (q * scale).to(q.dtype)
        s = tl.dot(qs, tl.trans(agent), input_precision=PRECISION)
        if HAS_BIAS:
            s += load_tile(Bias + b * sbb + h * sbh, offs_m, offs_a, sbn, sba, mask_m, A).to(tl.float32)
        lse = tl.load(Lse + pid * N + offs_m, mask=mask_m, other=0.0)
        p = tl.where(mask_a[None, :] & mask_m[:, None], tl.exp2(s * LOG2E - lse[:, None]), 0.0)
        do = load_tile(DOut + b * sdob + h * sdoh, offs_m, offs_dv, sdon, sdod, mask_m, DV)
        o = load_tile(Out + b * sob + h * soh, offs_m, offs_dv, son, sod, mask_m, DV)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        dp = tl.dot(do, tl.trans(agent_v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        d_agent_v += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dsc = ds.to(q.dtype)
        dq = tl.dot(dsc, agent, input_precision=PRECISION) * scale
        tl.store(
            DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqn + offs_d[None, :] * sdqd,
            dq.to(DQ.dtype.element_ty),
            mask=mask_m[:, None] & mask_d[None, :],
        )
        d_agent += tl.dot(tl.trans(dsc), q, input_precision=PRECISION)
        if HAS_BIAS:
            tl.store(
                DBias + (pid * N + offs_m[:, None]) * A + offs_a[None, :],
                ds,
                mask=mask_m[:, None] & mask_a[None, :],
            )
    part = split * BH + pid
    tl.store(
        DAgentPart + (part * A + offs_a[:, None]) * D + offs_d[None, :],
        d_agent * scale,
        mask=mask_a[:, None] & mask_d[None, :],
    )
    tl.store(
        DAgentVPart + (part * A + offs_a[:, None]) * DV + offs_dv[None, :],
        d_agent_v,
        mask=mask_a[:, None] & mask_dv[None, :],
    )


@triton.jit
def _aggregate_bwd(
    Agent,
    K,
    V,
    Bias,
    AgentV,
    DAgentV,
    Lse,
    DK,
    DV_,
    DBias,
    DAgentPart,
    sab,
    saa,
    sah,
    sad,
    skb,
    skn,
    skh,
    skd,
    svb,
    svn,
    svh,
    svd,
    sbb,
    sbh,
    sba,
    sbn,
    sdkb,
    sdkn,
    sdkh,
    sdkd,
    sdvb,
    sdvn,
    sdvh,
    sdvd,
    H,
    A,
    N,
    D,
    DV,
    BH,
    scale,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    b = pid // H
    h = pid % H
    offs_a = tl.arange(0, BLOCK_A)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_a = offs_a < A
    mask_d = offs_d < D
    mask_dv = offs_dv < DV
    agent = load_tile(Agent + b * sab + h * sah, offs_a, offs_d, saa, sad, mask_a, D)
    agent_s = (agent * scale).to(agent.dtype)
    rows = (pid * A + offs_a[:, None]) * DV + offs_dv[None, :]
    mask_av = mask_a[:, None] & mask_dv[None, :]
    d_agent_v = tl.load(DAgentV + rows, mask=mask_av, other=0.0)
    delta = tl.sum(d_agent_v * tl.load(AgentV + rows, mask=mask_av, other=0.0), 1)
    d_agent_v = d_agent_v.to(agent.dtype)
    lse = tl.load(Lse + pid * A + offs_a, mask=mask_a, other=0.0)
    d_agent = tl.zeros([BLOCK_A, BLOCK_D], tl.float32)
    for tile in range(split, tl.cdiv(N, BLOCK_N), splits):
        n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = n < N
        k = load_tile(K + b * skb + h * skh, n, offs_d, skn, skd, mask_n, D)
        v = load_tile(V + b * svb + h * svh, n, offs_dv, svn, svd, mask_n, DV)
        s = tl.dot(agent_s, tl.trans(k), input_precision=PRECISION)
        if HAS_BIAS:
            s += load_tile(Bias + b * sbb + h * sbh, offs_a, n, sba, sbn, mask_a, N).to(tl.float32)
        p = tl.where(mask_a[:, None] & mask_n[None, :], tl.exp2(s * LOG2E - lse[:, None]), 0.0)
        dv = tl.dot(tl.trans(p.to(v.dtype)), d_agent_v, input_precision=PRECISION)
        tl.store(
            DV_ + b * sdvb + h * sdvh + n[:, None] * sdvn + offs_dv[None, :] * sdvd,
            dv.to(DV_.dtype.element_ty),
            mask=mask_n[:, None] & mask_dv[None, :],
        )
        dp = tl.dot(d_agent_v, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dsc = ds.to(k.dtype)
        dk = tl.dot(tl.trans(dsc), agent, input_precision=PRECISION) * scale
        tl.store(
            DK + b * sdkb + h * sdkh + n[:, None] * sdkn + offs_d[None, :] * sdkd,
            dk.to(DK.dtype.element_ty),
            mask=mask_n[:, None] & mask_d[None, :],
        )
        d_agent += tl.dot(dsc, k, input_precision=PRECISION)
        if HAS_BIAS:
            tl.store(
                DBias + (pid * A + offs_a[:, None]) * N + n[None, :],
                ds,
                mask=mask_a[:, None] & mask_n[None, :],
            )
    part = split * BH + pid
    tl.store(
        DAgentPart + (part * A + offs_a[:, None]) * D + offs_d[None, :],
        d_agent * scale,
        mask=mask_a[:, None] & mask_d[None, :],
    )


def _tile(n: int, block_a: int, interpret: bool, gpu_cap: int = 64) -> int:
    """Token tile: big under the interpreter (its cost is per program step), register-friendly on GPU
    (at most ``gpu_cap`` tokens up to 64 agents, 32 above)."""
    if interpret:
        return pow2_block(n, 128)
    return pow2_block(n, gpu_cap if block_a <= 64 else 32)


def _warps(block_a: int) -> int:
    """More warps when the agent tile (and its accumulators) is large, to keep them in registers."""
    return 4 if block_a <= 64 else 8


def _splits(bh: int, tiles: int, device: torch.device, per_sm: int = 4) -> int:
    """Programs per (batch, head) sharing its token tiles, so that ``bh * splits`` gives about
    ``per_sm`` programs per streaming multiprocessor (1 off the GPU, never more than ``tiles``)."""
    if device.type != "cuda":
        return 1
    target = per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(tiles, triton.cdiv(target, bh)))


def agent_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agent: torch.Tensor,
    agent_bias: torch.Tensor | None,
    query_bias: torch.Tensor | None,
    scale: float,
    interpret: bool,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``out [B, Nq, H, Dv]``, ``agent_v [B, H, A, Dv]`` (fp32) and the base-2 log-sum-exps
    ``lse_agent [B, H, A]``, ``lse_query [B, H, Nq]``. ``splits`` programs share the keys of one
    (batch, head) in the aggregation (default: enough to fill the GPU)."""
    batch, nq, heads, dim = q.shape
    nk, num_agents, dv = k.shape[1], agent.shape[1], v.shape[3]
    bh = batch * heads
    dev = q.device
    block_a, block_d, block_dv = pow2_block(num_agents, 256), pow2_block(dim, 256), pow2_block(dv, 256)
    precision = dot_precision(q.dtype)
    block_n = _tile(nk, block_a, interpret)
    splits = splits or _splits(bh, triton.cdiv(nk, block_n), dev, per_sm=1)
    agent_v = torch.empty(splits, batch, heads, num_agents, dv, device=dev, dtype=torch.float32)
    lse_agent = torch.empty(splits, batch, heads, num_agents, device=dev, dtype=torch.float32)
    _aggregate_fwd[(bh, splits)](
        agent,
        k,
        v,
        agent_bias if agent_bias is not None else agent,
        agent_v,
        lse_agent,
        *agent.stride(),
        *k.stride(),
        *v.stride(),
        *broadcast_strides(agent_bias),
        heads,
        num_agents,
        nk,
        dim,
        dv,
        bh,
        scale,
        HAS_BIAS=agent_bias is not None,
        PRECISION=precision,
        BLOCK_A=block_a,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        num_warps=_warps(block_a),
    )
    agent_v, lse_agent = _merge_splits(agent_v, lse_agent)
    lse_query = torch.empty(batch, heads, nq, device=dev, dtype=torch.float32)
    out = torch.empty(batch, nq, heads, dv, device=dev, dtype=q.dtype)
    block_m = _tile(nq, block_a, interpret)
    _broadcast_fwd[(bh, triton.cdiv(nq, block_m))](
        q,
        agent,
        agent_v,
        query_bias if query_bias is not None else q,
        out,
        lse_query,
        *q.stride(),
        *agent.stride(),
        *broadcast_strides(query_bias),
        *out.stride(),
        heads,
        num_agents,
        nq,
        dim,
        dv,
        scale,
        HAS_BIAS=query_bias is not None,
        PRECISION=precision,
        BLOCK_M=block_m,
        BLOCK_A=block_a,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        num_warps=_warps(block_a),
    )
    return out, agent_v, lse_agent, lse_query


def _merge_splits(parts: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine per-split softmax results ``[S, ..., Dv]`` with their base-2 log-sum-exps ``[S, ...]``."""
    if parts.shape[0] == 1:
        return parts[0], lse[0]
    top = lse.amax(0)
    weight = torch.exp2(lse - top)
    total = weight.sum(0)
    return (weight.unsqueeze(-1) * parts).sum(0) / total.unsqueeze(-1), top + torch.log2(total)


def _reduce_bias_grad(dbias: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return (dbias.sum(0, keepdim=True) if bias.shape[0] == 1 else dbias).to(bias.dtype)


def agent_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agent: torch.Tensor,
    agent_bias: torch.Tensor | None,
    query_bias: torch.Tensor | None,
    out: torch.Tensor,
    agent_v: torch.Tensor,
    lse_agent: torch.Tensor,
    lse_query: torch.Tensor,
    scale: float,
    interpret: bool,
) -> tuple[torch.Tensor, ...]:
    """Gradients ``(dq, dk, dv, d_agent, d_agent_bias | None, d_query_bias | None)``."""
    batch, nq, heads, dim = q.shape
    nk, num_agents, dv = k.shape[1], agent.shape[1], v.shape[3]
    bh = batch * heads
    dev = q.device
    block_a, block_d, block_dv = pow2_block(num_agents, 256), pow2_block(dim, 256), pow2_block(dv, 256)
    precision = dot_precision(q.dtype)
    f32 = dict(device=dev, dtype=torch.float32)
    dq = torch.empty(q.shape, device=dev, dtype=q.dtype)
    dk = torch.empty(k.shape, device=dev, dtype=k.dtype)
    dv_ = torch.empty(v.shape, device=dev, dtype=v.dtype)
    dq_bias = torch.empty(batch, heads, nq, num_agents, **f32) if query_bias is not None else None
    da_bias = torch.empty(batch, heads, num_agents, nk, **f32) if agent_bias is not None else None

    block_m = _tile(nq, block_a, interpret)
    splits_q = _splits(bh, triton.cdiv(nq, block_m), dev)
    d_agent_q = torch.empty(splits_q, batch, heads, num_agents, dim, **f32)
    d_agent_v = torch.empty(splits_q, batch, heads, num_agents, dv, **f32)
    _broadcast_bwd[(bh, splits_q)](
        q,
        agent,
        agent_v,
        query_bias if query_bias is not None else q,
        out,
        dout,
        lse_query,
        dq,
        dq_bias if dq_bias is not None else lse_query,
        d_agent_q,
        d_agent_v,
        *q.stride(),
        *agent.stride(),
        *broadcast_strides(query_bias),
        *out.stride(),
        *dout.stride(),
        *dq.stride(),
        heads,
        num_agents,
        nq,
        dim,
        dv,
        bh,
        scale,
        HAS_BIAS=query_bias is not None,
        PRECISION=precision,
        BLOCK_M=block_m,
        BLOCK_A=block_a,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        num_warps=_warps(block_a),
    )
    d_agent_v = d_agent_v.sum(0)

    # the key loop holds four agents x keys fp32 tiles (s, p, dp, ds): 64 keys by 64 agents spilled
    # (sm_90, 4 warps, 255 registers at 49 agents), 32 keys from 64 agents up do not
    block_n = _tile(nk, block_a, interpret, gpu_cap=32 if block_a >= 64 else 64)
    splits_k = _splits(bh, triton.cdiv(nk, block_n), dev)
    d_agent_k = torch.empty(splits_k, batch, heads, num_agents, dim, **f32)
    _aggregate_bwd[(bh, splits_k)](
        agent,
        k,
        v,
        agent_bias if agent_bias is not None else agent,
        agent_v,
        d_agent_v,
        lse_agent,
        dk,
        dv_,
        da_bias if da_bias is not None else lse_agent,
        d_agent_k,
        *agent.stride(),
        *k.stride(),
        *v.stride(),
        *broadcast_strides(agent_bias),
        *dk.stride(),
        *dv_.stride(),
        heads,
        num_agents,
        nk,
        dim,
        dv,
        bh,
        scale,
        HAS_BIAS=agent_bias is not None,
        PRECISION=precision,
        BLOCK_A=block_a,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        num_warps=_warps(block_a),
    )
    d_agent = (d_agent_q.sum(0) + d_agent_k.sum(0)).transpose(1, 2).to(agent.dtype)
    return (
        dq,
        dk,
        dv_,
        d_agent,
        _reduce_bias_grad(da_bias, agent_bias) if agent_bias is not None else None,
        _reduce_bias_grad(dq_bias, query_bias) if query_bias is not None else None,
    )
