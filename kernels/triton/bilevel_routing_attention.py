"""Triton kernels of bi-level routing attention: block-sparse flash attention over routed regions.

Token addressing: the ``H x W`` map is cut into ``S x S`` regions of ``RH x RW`` tokens
(``RH = ceil(H / S)``); token ``t`` of region ``r`` sits at row ``(r // S) * RH + t // RW``,
column ``(r % S) * RW + t % RW``. Slots beyond the real map are masked, so no padded copy
of q/k/v is made, and q/k/v are read in place through their strides (the qkv projection's
split views work as they are).

Packed tiles: a *segment* is one (batch, head, region); its ``T = RH*RW`` token slots are rows
``seg * T .. seg * T + T - 1`` of one flat row space over all segments (``seg = (b * heads + h) *
S*S + region``). A program owns ``BLOCK`` consecutive rows of that space, so a tile holds several
small regions (and heads) at once instead of one region padded to the tile height: at BiFormer-S's
4-token regions a 64-row tile is 16 regions, not 4 real rows and 60 padding. Each segment keeps
its own routed keys: the program walks the concatenated key slots of its segments and masks the
score tile block-diagonally (a row only sees the keys of its own segment).

* forward / dQ: one program per tile of query rows; the key slots of segment ``g`` are the
  ``topk * T`` tokens of its routed regions, read by index from their place in the map.
* dK/dV: one program per tile of key rows; the query segments that routed to each key segment
  form a CSR list built in PyTorch, walked ``T`` rows per entry. No atomics.

Softmax in base 2 with the log-sum-exp kept in log2 units (see ``_common``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from visattn.kernels.ops.dispatch import interpreter_enabled
from visattn.kernels.reference.bilevel_routing_attention import region_grid, valid_tokens
from visattn.kernels.triton.common import (
    LOG2E,
    dot_precision,
    finish_softmax,
    online_softmax_step,
    pow2_block,
)


@triton.jit
def _token_coords(region, t, S, RH, RW):
    """Row/column in the map of token slots ``t`` of ``region``."""
    return (region // S) * RH + t // RW, (region % S) * RW + t % RW


@triton.jit
def _at(P, b, h, y, x, sb, sy, sx, sh):
    """Addresses of tokens ``(b, y, x)``, head ``h`` of a ``[B, H, W, heads, ...]`` tensor (vectors in)."""
    return P + b * sb + h * sh + y * sy + x * sx


@triton.jit
def _segment_rows(rows, N_ROWS, H, W, NH, S: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr):
    """Segment, batch (int64), head, map row/column and validity of flat token rows ``rows``."""
    T = RH * RW
    seg = rows // T
    bh = seg // (S * S)
    y, x = _token_coords(seg % (S * S), rows % T, S, RH, RW)
    ok = (rows < N_ROWS) & (y < H) & (x < W)
    return seg, (bh // NH).to(tl.int64), bh % NH, y, x, ok


@triton.jit
def _routed_keys(ROUTE, srb, srr, srk, slots, n_slots, TOPK, H, W, NH, BLOCK_M: tl.constexpr,
                 S: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr):  # fmt: skip
    """Key slots ``slots`` of the program's query tile (offsets into the concatenated ``topk * T``
    routed key tokens of its segments, first segment first): their segment, batch (int64), head,
    map row/column and validity (``slots < n_slots`` and inside the map)."""
    T = RH * RW
    per_seg = TOPK * T
    seg = (tl.program_id(0) * BLOCK_M) // T + slots // per_seg
    slot = slots % per_seg
    bh = seg // (S * S)
    b = (bh // NH).to(tl.int64)
    in_range = slots < n_slots
    region = tl.load(ROUTE + b * srb + (seg % (S * S)) * srr + (slot // T) * srk, mask=in_range, other=0)
    y, x = _token_coords(region, slot % T, S, RH, RW)
    return seg, b, bh % NH, y, x, in_range & (y < H) & (x < W)


@triton.jit
def _bra_fwd_kernel(
    Q, K, V, ROUTE, OUT, LSE,
    sqb, sqy, sqx, sqh, sqd,
    skb, sky, skx, skh, skd,
    svb, svy, svx, svh, svd,
    sob, soy, sox, soh, sod,
    srb, srr, srk,
    slb, slh, sly, slx,
    H, W, TOPK, NH, N_ROWS, qk_scale,
    S: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    T = RH * RW
    first = tl.program_id(0) * BLOCK_M
    rows = first + tl.arange(0, BLOCK_M)
    seg, b, h, qy, qx, q_ok = _segment_rows(rows, N_ROWS, H, W, NH, S, RH, RW)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        _at(Q, b, h, qy, qx, sqb, sqy, sqx, sqh)[:, None] + offs_d[None, :] * sqd,
        mask=q_ok[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    last = tl.minimum(first + BLOCK_M, N_ROWS) - 1
    n_slots = (last // T - first // T + 1) * TOPK * T
    for start in range(0, n_slots, BLOCK_N):
        kseg, kb, kh, ky, kx, k_ok = _routed_keys(
            ROUTE, srb, srr, srk, start + tl.arange(0, BLOCK_N), n_slots, TOPK, H, W, NH, BLOCK_M, S, RH, RW
        )
        k = tl.load(
            _at(K, kb, kh, ky, kx, skb, sky, skx, skh)[:, None] + offs_d[None, :] * skd,
            mask=k_ok[:, None] & (offs_d[None, :] < D),
            other=0.0,
        )
        v = tl.load(
            _at(V, kb, kh, ky, kx, svb, svy, svx, svh)[:, None] + offs_dv[None, :] * svd,
            mask=k_ok[:, None] & (offs_dv[None, :] < DV),
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(k_ok[None, :] & (seg[:, None] == kseg[None, :]), s, float("-inf"))
        m_i, l_i, alpha, p = online_softmax_step(m_i, l_i, s)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    out, lse = finish_softmax(acc, m_i, l_i)
    tl.store(
        _at(OUT, b, h, qy, qx, sob, soy, sox, soh)[:, None] + offs_dv[None, :] * sod,
        out.to(OUT.dtype.element_ty),
        mask=q_ok[:, None] & (offs_dv[None, :] < DV),
    )
    tl.store(_at(LSE, b, h, qy, qx, slb, sly, slx, slh), lse, mask=q_ok)


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
    H, W, TOPK, NH, N_ROWS, qk_scale, scale,
    S: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    T = RH * RW
    first = tl.program_id(0) * BLOCK_M
    seg, b, h, qy, qx, q_ok = _segment_rows(first + tl.arange(0, BLOCK_M), N_ROWS, H, W, NH, S, RH, RW)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        _at(Q, b, h, qy, qx, sqb, sqy, sqx, sqh)[:, None] + offs_d[None, :] * sqd,
        mask=q_ok[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    do = tl.load(
        _at(DO, b, h, qy, qx, sdob, sdoy, sdox, sdoh)[:, None] + offs_dv[None, :] * sdod,
        mask=q_ok[:, None] & (offs_dv[None, :] < DV),
        other=0.0,
    )
    lse = tl.load(_at(LSE, b, h, qy, qx, slb, sly, slx, slh), mask=q_ok, other=0.0)
    delta = tl.load(_at(DELTA, b, h, qy, qx, sdb, sdy, sdx, sdh), mask=q_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    last = tl.minimum(first + BLOCK_M, N_ROWS) - 1
    n_slots = (last // T - first // T + 1) * TOPK * T
    for start in range(0, n_slots, BLOCK_N):
        kseg, kb, kh, ky, kx, k_ok = _routed_keys(
            ROUTE, srb, srr, srk, start + tl.arange(0, BLOCK_N), n_slots, TOPK, H, W, NH, BLOCK_M, S, RH, RW
        )
        k = tl.load(
            _at(K, kb, kh, ky, kx, skb, sky, skx, skh)[:, None] + offs_d[None, :] * skd,
            mask=k_ok[:, None] & (offs_d[None, :] < D),
            other=0.0,
        )
        v = tl.load(
            _at(V, kb, kh, ky, kx, svb, svy, svx, svh)[:, None] + offs_dv[None, :] * svd,
            mask=k_ok[:, None] & (offs_dv[None, :] < DV),
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        live = k_ok[None, :] & (seg[:, None] == kseg[None, :])
        p = tl.where(live, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(
        _at(DQ, b, h, qy, qx, sdqb, sdqy, sdqx, sdqh)[:, None] + offs_d[None, :] * sdqd,
        (dq * scale).to(DQ.dtype.element_ty),
        mask=q_ok[:, None] & (offs_d[None, :] < D),
    )


@triton.jit
def _bra_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, QSEG, KSEG, SEG_OFF, DK, DV_,
    sqb, sqy, sqx, sqh, sqd,
    skb, sky, skx, skh, skd,
    svb, svy, svx, svh, svd,
    sdob, sdoy, sdox, sdoh, sdod,
    slb, slh, sly, slx,
    sdb, sdy, sdx, sdh,
    sdkb, sdky, sdkx, sdkh, sdkd,
    sdvb, sdvy, sdvx, sdvh, sdvd,
    H, W, NH, N_ROWS, qk_scale, scale,
    S: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    T = RH * RW
    first = tl.program_id(0) * BLOCK_N
    seg, b, h, ky, kx, k_ok = _segment_rows(first + tl.arange(0, BLOCK_N), N_ROWS, H, W, NH, S, RH, RW)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = tl.load(
        _at(K, b, h, ky, kx, skb, sky, skx, skh)[:, None] + offs_d[None, :] * skd,
        mask=k_ok[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    v = tl.load(
        _at(V, b, h, ky, kx, svb, svy, svx, svh)[:, None] + offs_dv[None, :] * svd,
        mask=k_ok[:, None] & (offs_dv[None, :] < DV),
        other=0.0,
    )
    # CSR entries (query segment, key segment) of this tile's key segments, T query rows each
    entry0 = tl.load(SEG_OFF + first // T)
    n_rows = (tl.load(SEG_OFF + (tl.minimum(first + BLOCK_N, N_ROWS) - 1) // T + 1) - entry0) * T
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for start in range(0, n_rows, BLOCK_M):
        row = start + tl.arange(0, BLOCK_M)
        in_range = row < n_rows
        entry = entry0 + row // T
        qseg = tl.load(QSEG + entry, mask=in_range, other=0)
        kseg = tl.load(KSEG + entry, mask=in_range, other=-1)
        _, qb, qh, qy, qx, q_ok = _segment_rows(qseg * T + row % T, N_ROWS, H, W, NH, S, RH, RW)
        q_ok = q_ok & in_range
        q = tl.load(
            _at(Q, qb, qh, qy, qx, sqb, sqy, sqx, sqh)[:, None] + offs_d[None, :] * sqd,
            mask=q_ok[:, None] & (offs_d[None, :] < D),
            other=0.0,
        )
        do = tl.load(
            _at(DO, qb, qh, qy, qx, sdob, sdoy, sdox, sdoh)[:, None] + offs_dv[None, :] * sdod,
            mask=q_ok[:, None] & (offs_dv[None, :] < DV),
            other=0.0,
        )
        lse = tl.load(_at(LSE, qb, qh, qy, qx, slb, sly, slx, slh), mask=q_ok, other=0.0)
        delta = tl.load(_at(DELTA, qb, qh, qy, qx, sdb, sdy, sdx, sdh), mask=q_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        live = q_ok[:, None] & k_ok[None, :] & (kseg[:, None] == seg[None, :])
        p = tl.where(live, tl.exp2(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
    tl.store(
        _at(DK, b, h, ky, kx, sdkb, sdky, sdkx, sdkh)[:, None] + offs_d[None, :] * sdkd,
        (dk * scale).to(DK.dtype.element_ty),
        mask=k_ok[:, None] & (offs_d[None, :] < D),
    )
    tl.store(
        _at(DV_, b, h, ky, kx, sdvb, sdvy, sdvx, sdvh)[:, None] + offs_dv[None, :] * sdvd,
        dv.to(DV_.dtype.element_ty),
        mask=k_ok[:, None] & (offs_dv[None, :] < DV),
    )


# Rows of a tile on a GPU: 64 lets Hopper issue wgmma; the CPU interpreter costs per program and
# loop step, not per element, so it takes bigger tiles.
TILE_ROWS = 64
INTERPRETER_TILE_ROWS = 256


@dataclass(frozen=True)
class TilePlan:
    """How the kernels tile one call on a ``height x width`` map: ``rows`` token rows (``batch *
    heads * S*S`` segments of ``tokens`` slots) in ``tiles`` tiles of ``block`` rows; ``key_block``:
    key slots per loop step."""

    height: int
    width: int
    num_regions: int
    tokens: int
    rows: int
    block: int
    key_block: int
    tiles: int

    def real_rows_per_tile(self) -> torch.Tensor:
        """``[tiles]`` count of rows that are tokens of the map (not padding of the region grid or
        of the last tile)."""
        valid = valid_tokens(self.height, self.width, self.num_regions, torch.device("cpu")).flatten()
        valid = valid.repeat(self.rows // valid.numel())
        return F.pad(valid, (0, self.tiles * self.block - self.rows)).view(self.tiles, self.block).sum(1)

    @property
    def real_fraction(self) -> float:
        """Share of all tile rows that are real tokens."""
        return int(self.real_rows_per_tile().sum()) / (self.tiles * self.block)

    @property
    def worst(self) -> float:
        """The emptiest tile's share of real rows."""
        return int(self.real_rows_per_tile().min()) / self.block


def tile_plan(
    shape: tuple[int, ...], num_regions: int, topk: int, interpreted: bool | None = None
) -> TilePlan:
    """The tiling :func:`bilevel_routing_attention_forward` / ``_backward`` launch for q of ``shape``
    ``[B, H, W, heads, d]`` (``topk``: routed regions per query region, after clamping). The
    forward, dQ and dK/dV programs all own ``block`` rows of the same flat row space.
    ``interpreted``: plan for the CPU interpreter (default: whether it is on)."""
    b, h, w, heads = shape[:4]
    interpreted = interpreter_enabled() if interpreted is None else interpreted
    cap = INTERPRETER_TILE_ROWS if interpreted else TILE_ROWS
    rh, rw = region_grid(h, w, num_regions)
    tokens = rh * rw
    rows = b * heads * num_regions**2 * tokens
    block = pow2_block(rows, cap)
    # key slots of one tile: topk * T per segment it touches
    key_block = pow2_block(topk * tokens * triton.cdiv(block, tokens), cap)
    return TilePlan(h, w, num_regions, tokens, rows, block, key_block, triton.cdiv(rows, block))


def _launch_consts(q: torch.Tensor, v: torch.Tensor, num_regions: int) -> dict:
    """The constexprs every BRA kernel takes besides its two block sizes."""
    rh, rw = region_grid(q.shape[1], q.shape[2], num_regions)
    return dict(
        S=num_regions,
        RH=rh,
        RW=rw,
        D=q.shape[-1],
        DV=v.shape[-1],
        BLOCK_D=pow2_block(q.shape[-1]),
        BLOCK_DV=pow2_block(v.shape[-1]),
        PRECISION=dot_precision(q.dtype),
    )


def bilevel_routing_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routing: torch.Tensor, num_regions: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k ``[B, H, W, heads, d]``, v ``[B, H, W, heads, dv]``, routing ``[B, S*S, topk]``.

    Returns ``out [B, H, W, heads, dv]`` and ``lse [B, heads, H, W]`` (float32, log2 units).
    """
    b, h, w, heads, _ = q.shape
    routing = routing.to(torch.int32)
    plan = tile_plan(q.shape, num_regions, routing.shape[-1])
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    lse = torch.empty((b, heads, h, w), dtype=torch.float32, device=q.device)
    _bra_fwd_kernel[(plan.tiles,)](
        q, k, v, routing, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *routing.stride(), *lse.stride(),
        h, w, routing.shape[-1], heads, plan.rows, scale * LOG2E.value,
        BLOCK_M=plan.block, BLOCK_N=plan.key_block, **_launch_consts(q, v, num_regions),
    )  # fmt: skip
    return out, lse


def _inverse_routing(routing: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR of the query segments routed to each key segment: ``(query_seg, key_seg, offsets)``.

    ``query_seg``/``key_seg`` ``[B * heads * S*S * topk]`` int32, sorted by key segment (segment =
    ``(b * heads + h) * S*S + region``); entries of key segment ``g`` are ``offsets[g]`` to
    ``offsets[g + 1]``.
    """
    b, n_regions, topk = routing.shape
    base = (torch.arange(b * heads, device=routing.device) * n_regions).view(b, heads, 1, 1)
    key = (base + routing[:, None]).flatten()
    query = (base + torch.arange(n_regions, device=routing.device).view(1, 1, -1, 1)).expand(-1, -1, -1, topk)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=b * heads * n_regions)
    offsets = torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0))
    return query.flatten()[order].to(torch.int32), key[order].to(torch.int32), offsets.to(torch.int32)


def bilevel_routing_attention_backward(
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
    """Gradients ``(dq, dk, dv)`` of :func:`bilevel_routing_attention_forward` for the output grad ``do``."""
    b, h, w, heads, _ = q.shape
    route32 = routing.to(torch.int32)
    plan = tile_plan(q.shape, num_regions, routing.shape[-1])
    consts = _launch_consts(q, v, num_regions)
    delta = (do.float() * out.float()).sum(-1)  # [B, H, W, heads]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    _bra_bwd_dq_kernel[(plan.tiles,)](
        q, k, v, do, route32, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *route32.stride(), *lse.stride(),
        *delta.stride(), *dq.stride(),
        h, w, routing.shape[-1], heads, plan.rows, scale * LOG2E.value, scale,
        BLOCK_M=plan.block, BLOCK_N=plan.key_block, **consts,
    )  # fmt: skip
    q_seg, k_seg, offsets = _inverse_routing(routing, heads)
    _bra_bwd_dkdv_kernel[(plan.tiles,)](
        q, k, v, do, lse, delta, q_seg, k_seg, offsets, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *lse.stride(), *delta.stride(),
        *dk.stride(), *dv.stride(),
        h, w, heads, plan.rows, scale * LOG2E.value, scale,
        BLOCK_M=plan.key_block, BLOCK_N=plan.block, **consts,
    )  # fmt: skip
    return dq, dk, dv
