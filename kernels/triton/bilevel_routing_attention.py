"""Triton kernels of bi-level routing attention: block-sparse flash attention over routed regions.

Token addressing: the ``H x W`` map is cut into ``S x S`` regions of ``RH x RW`` tokens
(``RH = ceil(H / S)``); token ``t`` of region ``r`` sits at row ``(r // S) * RH + t // RW``,
column ``(r % S) * RW + t % RW``. Slots beyond the real map are masked, so no padded copy
of q/k/v is made, and q/k/v are read in place through their strides (the qkv projection's
split views work as they are).

* forward / dQ: one program per (query region, block of its tokens, batch*head). It walks
  the ``topk * RH*RW`` routed key slots in blocks of ``BLOCK_N``; each slot's key region
  comes from the routing table, so K/V rows are loaded straight from their place in the map.
* dK/dV: one program per (key region, block of its tokens, batch*head). The inverse routing
  (which query regions routed to this key region) is a CSR list built in PyTorch; the
  program walks those query regions' tokens in blocks of ``BLOCK_M``. No atomics.

Softmax in base 2 with the log-sum-exp kept in log2 units (see ``_common``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from visattn.kernels._dispatch import interpreter_enabled
from visattn.kernels.reference.bilevel_routing_attention import region_grid
from visattn.kernels.triton._common import LOG2E, dot_precision, finish_softmax, online_softmax_step


@triton.jit
def _token_coords(region, t, S, RH, RW):
    """Row/column in the map of token slots ``t`` of ``region``."""
    return (region // S) * RH + t // RW, (region % S) * RW + t % RW


@triton.jit
def _bra_fwd_kernel(
    Q, K, V, ROUTE, OUT, LSE,
    sqb, sqy, sqx, sqh, sqd,
    skb, sky, skx, skh, skd,
    svb, svy, svx, svh, svd,
    sob, soy, sox, soh, sod,
    srb, srr, srk,
    slb, slh, sly, slx,
    H, W, TOPK, NH, qk_scale,
    S: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    T = RH * RW
    m_blocks = tl.cdiv(T, BLOCK_M)
    region = tl.program_id(0) // m_blocks
    b = (tl.program_id(1) // NH).to(tl.int64)  # batch offsets can pass 2**31 elements
    h = tl.program_id(1) % NH
    t = (tl.program_id(0) % m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    qy, qx = _token_coords(region, t, S, RH, RW)
    q_ok = (t < T) & (qy < H) & (qx < W)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        Q + b * sqb + h * sqh + qy[:, None] * sqy + qx[:, None] * sqx + offs_d[None, :] * sqd,
        mask=q_ok[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    n_keys = TOPK * T
    for start in range(0, n_keys, BLOCK_N):
        slot = start + tl.arange(0, BLOCK_N)
        in_range = slot < n_keys
        k_region = tl.load(ROUTE + b * srb + region * srr + (slot // T) * srk, mask=in_range, other=0)
        ky, kx = _token_coords(k_region, slot % T, S, RH, RW)
        k_ok = in_range & (ky < H) & (kx < W)
        k = tl.load(
            K + b * skb + h * skh + ky[:, None] * sky + kx[:, None] * skx + offs_d[None, :] * skd,
            mask=k_ok[:, None] & (offs_d[None, :] < D),
            other=0.0,
        )
        v = tl.load(
            V + b * svb + h * svh + ky[:, None] * svy + kx[:, None] * svx + offs_dv[None, :] * svd,
            mask=k_ok[:, None] & (offs_dv[None, :] < DV),
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(k_ok[None, :], s, float("-inf"))
        m_i, l_i, alpha, p = online_softmax_step(m_i, l_i, s)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    out, lse = finish_softmax(acc, m_i, l_i)
    tl.store(
        OUT + b * sob + h * soh + qy[:, None] * soy + qx[:, None] * sox + offs_dv[None, :] * sod,
        out.to(OUT.dtype.element_ty),
        mask=q_ok[:, None] & (offs_dv[None, :] < DV),
    )
    tl.store(LSE + b * slb + h * slh + qy * sly + qx * slx, lse, mask=q_ok)


@triton.jit
def _bra_bwd_dq_kernel(
    Q, K, V, DO, ROUTE, LSE, DELTA, DQ,
    sqb, sqy, sqx, sqh, sqd,
    skb, sky, skx, skh, skd,
    svb, svy, svx, svh, svd,
    sdob, sdoy, sdox, sdoh, sdod,
    srb, srr, srk,
    slb, slh, sly, slx,
    sdb, sdy, sdx, sdh,
    sdqb, sdqy, sdqx, sdqh, sdqd,
    H, W, TOPK, NH, qk_scale, scale,
    S: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    T = RH * RW
    m_blocks = tl.cdiv(T, BLOCK_M)
    region = tl.program_id(0) // m_blocks
    b = (tl.program_id(1) // NH).to(tl.int64)  # batch offsets can pass 2**31 elements
    h = tl.program_id(1) % NH
    t = (tl.program_id(0) % m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    qy, qx = _token_coords(region, t, S, RH, RW)
    q_ok = (t < T) & (qy < H) & (qx < W)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        Q + b * sqb + h * sqh + qy[:, None] * sqy + qx[:, None] * sqx + offs_d[None, :] * sqd,
        mask=q_ok[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    do = tl.load(
        DO + b * sdob + h * sdoh + qy[:, None] * sdoy + qx[:, None] * sdox + offs_dv[None, :] * sdod,
        mask=q_ok[:, None] & (offs_dv[None, :] < DV),
        other=0.0,
    )
    lse = tl.load(LSE + b * slb + h * slh + qy * sly + qx * slx, mask=q_ok, other=0.0)
    delta = tl.load(DELTA + b * sdb + h * sdh + qy * sdy + qx * sdx, mask=q_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_keys = TOPK * T
    for start in range(0, n_keys, BLOCK_N):
        slot = start + tl.arange(0, BLOCK_N)
        in_range = slot < n_keys
        k_region = tl.load(ROUTE + b * srb + region * srr + (slot // T) * srk, mask=in_range, other=0)
        ky, kx = _token_coords(k_region, slot % T, S, RH, RW)
        k_ok = in_range & (ky < H) & (kx < W)
        k = tl.load(
            K + b * skb + h * skh + ky[:, None] * sky + kx[:, None] * skx + offs_d[None, :] * skd,
            mask=k_ok[:, None] & (offs_d[None, :] < D),
            other=0.0,
        )
        v = tl.load(
            V + b * svb + h * svh + ky[:, None] * svy + kx[:, None] * svx + offs_dv[None, :] * svd,
            mask=k_ok[:, None] & (offs_dv[None, :] < DV),
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.where(k_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(
        DQ + b * sdqb + h * sdqh + qy[:, None] * sdqy + qx[:, None] * sdqx + offs_d[None, :] * sdqd,
        (dq * scale).to(DQ.dtype.element_ty),
        mask=q_ok[:, None] & (offs_d[None, :] < D),
    )


@triton.jit
def _bra_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, QLIST, QOFF, QCNT, DK, DV_,
    sqb, sqy, sqx, sqh, sqd,
    skb, sky, skx, skh, skd,
    svb, svy, svx, svh, svd,
    sdob, sdoy, sdox, sdoh, sdod,
    slb, slh, sly, slx,
    sdb, sdy, sdx, sdh,
    sdkb, sdky, sdkx, sdkh, sdkd,
    sdvb, sdvy, sdvx, sdvh, sdvd,
    H, W, NH, qk_scale, scale,
    S: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    T = RH * RW
    n_blocks = tl.cdiv(T, BLOCK_N)
    region = tl.program_id(0) // n_blocks
    b = (tl.program_id(1) // NH).to(tl.int64)  # batch offsets can pass 2**31 elements
    h = tl.program_id(1) % NH
    t = (tl.program_id(0) % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    ky, kx = _token_coords(region, t, S, RH, RW)
    k_ok = (t < T) & (ky < H) & (kx < W)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = tl.load(
        K + b * skb + h * skh + ky[:, None] * sky + kx[:, None] * skx + offs_d[None, :] * skd,
        mask=k_ok[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    v = tl.load(
        V + b * svb + h * svh + ky[:, None] * svy + kx[:, None] * svx + offs_dv[None, :] * svd,
        mask=k_ok[:, None] & (offs_dv[None, :] < DV),
        other=0.0,
    )
    n_regions = S * S
    first = tl.load(QOFF + b * n_regions + region)
    n_rows = tl.load(QCNT + b * n_regions + region) * T
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for start in range(0, n_rows, BLOCK_M):
        row = start + tl.arange(0, BLOCK_M)
        in_range = row < n_rows
        q_region = tl.load(QLIST + first + row // T, mask=in_range, other=0)
        qy, qx = _token_coords(q_region, row % T, S, RH, RW)
        q_ok = in_range & (qy < H) & (qx < W)
        q = tl.load(
            Q + b * sqb + h * sqh + qy[:, None] * sqy + qx[:, None] * sqx + offs_d[None, :] * sqd,
            mask=q_ok[:, None] & (offs_d[None, :] < D),
            other=0.0,
        )
        do = tl.load(
            DO + b * sdob + h * sdoh + qy[:, None] * sdoy + qx[:, None] * sdox + offs_dv[None, :] * sdod,
            mask=q_ok[:, None] & (offs_dv[None, :] < DV),
            other=0.0,
        )
        lse = tl.load(LSE + b * slb + h * slh + qy * sly + qx * slx, mask=q_ok, other=0.0)
        delta = tl.load(DELTA + b * sdb + h * sdh + qy * sdy + qx * sdx, mask=q_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.where(q_ok[:, None] & k_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
    tl.store(
        DK + b * sdkb + h * sdkh + ky[:, None] * sdky + kx[:, None] * sdkx + offs_d[None, :] * sdkd,
        (dk * scale).to(DK.dtype.element_ty),
        mask=k_ok[:, None] & (offs_d[None, :] < D),
    )
    tl.store(
        DV_ + b * sdvb + h * sdvh + ky[:, None] * sdvy + kx[:, None] * sdvx + offs_dv[None, :] * sdvd,
        dv.to(DV_.dtype.element_ty),
        mask=k_ok[:, None] & (offs_dv[None, :] < DV),
    )


def _block(n: int, cap: int) -> int:
    return min(max(16, triton.next_power_of_2(n)), cap)


def _config(q: torch.Tensor, v: torch.Tensor, num_regions: int, topk: int) -> dict:
    """Geometry and block sizes shared by the launchers."""
    h, w = q.shape[1:3]
    rh, rw = region_grid(h, w, num_regions)
    tokens = rh * rw
    # The interpreter costs per program and loop step, not per element: take big blocks there.
    cap = 256 if interpreter_enabled() else 64
    return dict(
        rh=rh,
        rw=rw,
        tokens=tokens,
        own=_block(tokens, cap),
        other=_block(topk * tokens, cap),
        block_d=max(16, triton.next_power_of_2(q.shape[-1])),
        block_dv=max(16, triton.next_power_of_2(v.shape[-1])),
        precision=dot_precision(q.dtype),
    )


def bra_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routing: torch.Tensor, num_regions: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k ``[B, H, W, heads, d]``, v ``[B, H, W, heads, dv]``, routing ``[B, S*S, topk]``.

    Returns ``out [B, H, W, heads, dv]`` and ``lse [B, heads, H, W]`` (float32, log2 units).
    """
    b, h, w, heads, d = q.shape
    routing = routing.to(torch.int32)
    cfg = _config(q, v, num_regions, routing.shape[-1])
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    lse = torch.empty((b, heads, h, w), dtype=torch.float32, device=q.device)
    grid = (num_regions * num_regions * triton.cdiv(cfg["tokens"], cfg["own"]), b * heads)
    _bra_fwd_kernel[grid](
        q, k, v, routing, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *routing.stride(), *lse.stride(),
        h, w, routing.shape[-1], heads, scale * LOG2E.value,
        S=num_regions, RH=cfg["rh"], RW=cfg["rw"], D=d, DV=v.shape[-1],
        BLOCK_M=cfg["own"], BLOCK_N=cfg["other"],
        BLOCK_D=cfg["block_d"], BLOCK_DV=cfg["block_dv"], PRECISION=cfg["precision"],
    )  # fmt: skip
    return out, lse


def _inverse_routing(routing: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR of the query regions routed to each key region: (list, offsets, counts).

    ``list`` holds query-region indices grouped by (batch, key region); ``offsets``/``counts``
    are ``[B * S*S]`` int32 positions in it.
    """
    b, n_regions, topk = routing.shape
    key = (routing + torch.arange(b, device=routing.device)[:, None, None] * n_regions).flatten()
    order = torch.argsort(key, stable=True)
    query = torch.arange(n_regions, device=routing.device).repeat_interleave(topk).repeat(b)
    counts = torch.bincount(key, minlength=b * n_regions)
    offsets = torch.cumsum(counts, 0) - counts
    return query[order].to(torch.int32), offsets.to(torch.int32), counts.to(torch.int32)


def bra_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    routing: torch.Tensor,
    num_regions: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of :func:`bra_forward` for the output gradient ``do``."""
    b, h, w, heads, d = q.shape
    dv_dim = v.shape[-1]
    route32 = routing.to(torch.int32)
    cfg = _config(q, v, num_regions, routing.shape[-1])
    delta = (do.float() * out.float()).sum(-1)  # [B, H, W, heads]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    n_regions = num_regions * num_regions
    consts = dict(
        S=num_regions,
        RH=cfg["rh"],
        RW=cfg["rw"],
        D=d,
        DV=dv_dim,
        BLOCK_D=cfg["block_d"],
        BLOCK_DV=cfg["block_dv"],
        PRECISION=cfg["precision"],
    )
    grid = (n_regions * triton.cdiv(cfg["tokens"], cfg["own"]), b * heads)
    _bra_bwd_dq_kernel[grid](
        q, k, v, do, route32, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *route32.stride(), *lse.stride(),
        *delta.stride(), *dq.stride(),
        h, w, routing.shape[-1], heads, scale * LOG2E.value, scale,
        BLOCK_M=cfg["own"], BLOCK_N=cfg["other"], **consts,
    )  # fmt: skip
    q_list, q_off, q_cnt = _inverse_routing(routing)
    grid = (n_regions * triton.cdiv(cfg["tokens"], cfg["own"]), b * heads)
    _bra_bwd_dkdv_kernel[grid](
        q, k, v, do, lse, delta, q_list, q_off, q_cnt, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *lse.stride(), *delta.stride(),
        *dk.stride(), *dv.stride(),
        h, w, heads, scale * LOG2E.value, scale,
        BLOCK_M=cfg["other"], BLOCK_N=cfg["own"], **consts,
    )  # fmt: skip
    return dq, dk, dv
