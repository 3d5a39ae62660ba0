"""Triton kernels of large-kernel attention (LKA) on channels-first ``[B, C, H, W]`` tensors.

Forward (two launches):

1. :func:`dw_chain` — the two depthwise convolutions in one kernel. A program owns a
   spatial tile of one ``(batch, channel)`` plane; it first evaluates the first convolution
   (``k1 x k1``) on the tile grown by the halo of the second (dilated ``k2 x k2``) one, zero
   outside the image as the zero padding of the second convolution requires, parks that
   region in a per-program scratch slot (a few KiB, L1/L2-resident; the grid is persistent
   so the scratch stays small), then evaluates the second convolution from it. The
   intermediate never makes a round trip through a full-size tensor.
2. :func:`pointwise_gate` — the 1x1 convolution as a GEMM over channels with the bias and
   the gating product ``x * attn`` in its epilogue, so ``attn`` is never written.

Backward: the 1x1 parts are GEMMs left to cuBLAS (``torch.matmul``). The input gradient of a
same-padded depthwise convolution is the same convolution with the spatially flipped kernel, so
the chain ``g_x = dwconv(dwconv_dilated(g_d, flip(w2)), flip(w1)) + grad * attn`` is one
:func:`dw_chain` launch too (each convolution has its own kernel size and dilation; the direct
``grad * attn`` term is added in the epilogue), which also stores the intermediate ``g_a`` over the
tiles it owns, for the weight gradient of the first convolution. Weight gradients use
:func:`dwconv_weight_grad` (per-tile partial sums of every tap, reduced by ``torch.sum``); the
intermediate ``dwconv(x)`` that the dilated kernel's weight gradient needs is recomputed with
:func:`dwconv` instead of saved.

``visattn bench lka`` times this against the official nn.Conv2d chain and against the same forward with
the two depthwise convolutions as two :func:`dwconv` launches (row ``triton 2-kernel (fwd)``), which is
the fallback should the fused chain not pay on some GPU.

Under the CPU interpreter (which costs per operation, not per element) a program handles up to 256
channel planes at once; on a GPU one plane per program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from visattn.kernels.triton.common import pow2_block

_NUM_WARPS = 4


@triton.jit
def _dw_chain_kernel(
    x_ptr,
    w1_ptr,
    b1_ptr,
    w2_ptr,
    b2_ptr,
    add_ptr,
    out_ptr,
    mid_ptr,
    scratch_ptr,
    n_planes,
    C,
    H,
    W,
    tiles_w,
    tiles_per_block,
    total_tiles,
    K1: tl.constexpr,
    DIL1: tl.constexpr,
    K2: tl.constexpr,
    DIL2: tl.constexpr,
    PB: tl.constexpr,
    RH: tl.constexpr,
    RW: tl.constexpr,
    HAS_B1: tl.constexpr,
    HAS_B2: tl.constexpr,
    HAS_ADD: tl.constexpr,
    STORE_MID: tl.constexpr,
):
    # A work item is PB planes x one spatial tile. A region of RH x RW intermediate values per
    # plane feeds an output tile of (RH - 2*P2) x (RW - 2*P2); the region's halo is the second conv's.
    P1: tl.constexpr = DIL1 * (K1 // 2)
    P2: tl.constexpr = DIL2 * (K2 // 2)
    TILE_H: tl.constexpr = RH - 2 * P2
    TILE_W: tl.constexpr = RW - 2 * P2
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    pp = tl.arange(0, PB)[:, None, None]
    rr = tl.arange(0, RH)[None, :, None]
    cc = tl.arange(0, RW)[None, None, :]
    slot = scratch_ptr + pid.to(tl.int64) * (PB * RH * RW) + pp * (RH * RW)
    in_tile = (rr < TILE_H) & (cc < TILE_W)
    for t in range(pid, total_tiles, nprog):
        plane = (t // tiles_per_block) * PB + pp
        rem = t % tiles_per_block
        oh0 = (rem // tiles_w) * TILE_H
        ow0 = (rem % tiles_w) * TILE_W
        pvalid = plane < n_planes
        ch = plane % C
        base = plane.to(tl.int64) * H * W
        # phase 1: first depthwise conv on the tile + halo, zero outside the image
        ih = oh0 - P2 + rr
        iw = ow0 - P2 + cc
        # taps are scalar offsets from int32 element offsets (64-bit pointers per element cost twice the
        # registers). Phase 1 loops over tap rows and columns: with its columns unrolled the compiler
        # hoists every column's bounds mask out of the row loop, and the 64x64 regions of VAN stage 1
        # spilled on sm_90 (255 registers; 168 now, no spill). Phase 2 has no per-tap masks, so its
        # columns stay unrolled (all 49 taps of a 7x7 unrolled made the sm_90 compile take 43 s).
        acc = tl.zeros((PB, RH, RW), dtype=tl.float32)
        xb = x_ptr + base
        xo = ih * W + iw  # a tap is a scalar offset from here
        for i in range(K1):
            yh = ih + (i * DIL1 - P1)
            row_ok = pvalid & (yh >= 0) & (yh < H)
            for j in range(K1):
                w = tl.load(w1_ptr + ch * (K1 * K1) + (i * K1 + j), mask=pvalid, other=0.0).to(tl.float32)
                yw = iw + (j * DIL1 - P1)
                m = row_ok & (yw >= 0) & (yw < W)
                v = tl.load(xb + (xo + ((i * DIL1 - P1) * W + (j * DIL1 - P1))), mask=m, other=0.0)
                acc += w * v.to(tl.float32)
        if HAS_B1:
            acc += tl.load(b1_ptr + ch, mask=pvalid, other=0.0).to(tl.float32)
        inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        acc = tl.where(inside, acc, 0.0)
        if STORE_MID:
            # the intermediate over the tile this work item owns (each position has exactly one owner)
            owned = pvalid & inside & (rr >= P2) & (rr < P2 + TILE_H) & (cc >= P2) & (cc < P2 + TILE_W)
            tl.store(mid_ptr + base + ih * W + iw, acc.to(mid_ptr.dtype.element_ty), mask=owned)
        tl.debug_barrier()  # the previous work item's phase-2 reads of this slot are done
        tl.store(slot + rr * RW + cc, acc)
        tl.debug_barrier()  # the region is visible to every thread of the program
        # phase 2: second depthwise conv read from the region
        out = tl.zeros((PB, RH, RW), dtype=tl.float32)
        for i in range(K2):
            for j in tl.static_range(K2):
                w = tl.load(w2_ptr + ch * (K2 * K2) + (i * K2 + j), mask=pvalid, other=0.0).to(tl.float32)
                v = tl.load(slot + (rr + i * DIL2) * RW + (cc + j * DIL2), mask=in_tile, other=0.0)
                out += w * v
        if HAS_B2:
            out += tl.load(b2_ptr + ch, mask=pvalid, other=0.0).to(tl.float32)
        oh = oh0 + rr
        ow = ow0 + cc
        keep = pvalid & in_tile & (oh < H) & (ow < W)
        if HAS_ADD:
            out += tl.load(add_ptr + base + oh * W + ow, mask=keep, other=0.0).to(tl.float32)
        tl.store(out_ptr + base + oh * W + ow, out.to(out_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _dwconv_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    n_planes,
    C,
    H,
    W,
    tiles_w,
    K: tl.constexpr,
    DIL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PB: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    plane = tl.program_id(0) * PB + tl.arange(0, PB)[:, None, None]
    tile = tl.program_id(1)
    pvalid = plane < n_planes
    ch = plane % C
    base = plane.to(tl.int64) * H * W
    oh = (tile // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H)[None, :, None]
    ow = (tile % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)[None, None, :]
    P: tl.constexpr = DIL * (K // 2)
    acc = tl.zeros((PB, BLOCK_H, BLOCK_W), dtype=tl.float32)
    for i in tl.static_range(K):
        for j in tl.static_range(K):
            w = tl.load(w_ptr + ch * (K * K) + (i * K + j), mask=pvalid, other=0.0).to(tl.float32)
            yh = oh + (i * DIL - P)
            yw = ow + (j * DIL - P)
            m = pvalid & (yh >= 0) & (yh < H) & (yw >= 0) & (yw < W)
            acc += w * tl.load(x_ptr + base + yh * W + yw, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + ch, mask=pvalid, other=0.0).to(tl.float32)
    keep = pvalid & (oh < H) & (ow < W)
    tl.store(out_ptr + base + oh * W + ow, acc.to(out_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _dwconv_wgrad_kernel(
    x_ptr,
    g_ptr,
    partial_ptr,
    n_planes,
    H,
    W,
    tiles_w,
    n_tiles,
    K: tl.constexpr,
    DIL: tl.constexpr,
    PB: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # partial[plane, tile, k] = sum over the tile of g(p) * x(p + shift_k); the last slot holds sum(g)
    pvec = tl.program_id(0) * PB + tl.arange(0, PB)
    plane = pvec[:, None, None]
    tile = tl.program_id(1)
    pvalid = plane < n_planes
    base = plane.to(tl.int64) * H * W
    oh = (tile // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H)[None, :, None]
    ow = (tile % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)[None, None, :]
    keep = pvalid & (oh < H) & (ow < W)
    g = tl.load(g_ptr + base + oh * W + ow, mask=keep, other=0.0).to(tl.float32)
    out = partial_ptr + (pvec.to(tl.int64) * n_tiles + tile) * (K * K + 1)
    P: tl.constexpr = DIL * (K // 2)
    for i in tl.static_range(K):
        for j in tl.static_range(K):
            yh = oh + (i * DIL - P)
            yw = ow + (j * DIL - P)
            m = keep & (yh >= 0) & (yh < H) & (yw >= 0) & (yw < W)
            v = tl.load(x_ptr + base + yh * W + yw, mask=m, other=0.0).to(tl.float32)
            tl.store(out + (i * K + j), tl.sum(tl.sum(g * v, axis=2), axis=1), mask=pvec < n_planes)
    tl.store(out + K * K, tl.sum(tl.sum(g, axis=2), axis=1), mask=pvec < n_planes)


@triton.jit
def _pointwise_gate_kernel(
    w_ptr,
    b_ptr,
    d_ptr,
    x_ptr,
    out_ptr,
    C,
    HW,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # out[b, m, n] = x[b, m, n] * (sum_k w[m, k] * d[b, k, n] + bias[m])
    b = tl.program_id(0)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    base = b.to(tl.int64) * C * HW
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        kk = k0 + rk
        a = tl.load(
            w_ptr + rm[:, None] * C + kk[None, :], mask=(rm[:, None] < C) & (kk[None, :] < C), other=0.0
        )
        bt = tl.load(
            d_ptr + base + kk[:, None] * HW + rn[None, :],
            mask=(kk[:, None] < C) & (rn[None, :] < HW),
            other=0.0,
        )
        acc = tl.dot(a.to(bt.dtype), bt, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rm, mask=rm < C, other=0.0).to(tl.float32)[:, None]
    keep = (rm[:, None] < C) & (rn[None, :] < HW)
    offs = base + rm[:, None] * HW + rn[None, :]
    acc = acc * tl.load(x_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=keep)


def _region(size: int, halo: int) -> int:
    """Power-of-two region edge for :func:`dw_chain`, given the halo of its second convolution: the
    whole plane plus halo when that is small, else 64 (a 46-wide output tile for the forward's halo of
    9, 60-wide for the backward's halo of 2), more only for very wide halos."""
    return min(triton.next_power_of_2(size + 2 * halo), max(64, triton.next_power_of_2(4 * halo)))


def _planes_per_program(n_planes: int, device: torch.device) -> int:
    """One plane per program on a GPU; under the interpreter (which costs per op, not per element)
    as many planes as possible, so that a handful of programs does the whole tensor."""
    return 1 if device.type == "cuda" else min(triton.next_power_of_2(n_planes), 256)


def _max_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count * 8
    return 2


def dw_chain(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    dilation1: int,
    dilation2: int,
    add: torch.Tensor | None = None,
    keep_mid: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Two same-padded depthwise convolutions in one launch: ``mid = dwconv(x, w1, b1, dilation1)``,
    ``out = dwconv(mid, w2, b2, dilation2) + add``.

    ``x`` and ``add`` ``[B, C, H, W]``; ``w1`` ``[C, k1*k1]``, ``w2`` ``[C, k2*k2]``, biases ``[C]`` (all
    contiguous; odd ``k1``, ``k2``). Returns ``(out, mid)`` in ``x.dtype``; ``mid`` is written only when
    ``keep_mid`` (else None). Forward of LKA: ``(w1, 1, w2, dilation)``; input gradient: the flipped
    kernels in the opposite order.
    """
    bsz, chans, h, w = x.shape
    k1 = int(round(w1.shape[1] ** 0.5))
    k2 = int(round(w2.shape[1] ** 0.5))
    halo = dilation2 * (k2 // 2)
    rh, rw = _region(h, halo), _region(w, halo)
    tiles_w = triton.cdiv(w, rw - 2 * halo)
    tiles_per_block = triton.cdiv(h, rh - 2 * halo) * tiles_w
    n_planes = bsz * chans
    pb = _planes_per_program(n_planes, x.device)
    total = triton.cdiv(n_planes, pb) * tiles_per_block
    nprog = min(total, _max_programs(x.device))
    scratch = torch.empty(nprog * pb * rh * rw, device=x.device, dtype=torch.float32)
    out = torch.empty_like(x)
    mid = torch.empty_like(x) if keep_mid else None
    _dw_chain_kernel[(nprog,)](
        x,
        w1,
        b1 if b1 is not None else w1,
        w2,
        b2 if b2 is not None else w2,
        add if add is not None else x,
        out,
        mid if mid is not None else out,
        scratch,
        n_planes,
        chans,
        h,
        w,
        tiles_w,
        tiles_per_block,
        total,
        K1=k1,
        DIL1=dilation1,
        K2=k2,
        DIL2=dilation2,
        PB=pb,
        RH=rh,
        RW=rw,
        HAS_B1=b1 is not None,
        HAS_B2=b2 is not None,
        HAS_ADD=add is not None,
        STORE_MID=keep_mid,
        num_warps=_NUM_WARPS,
    )
    return out, mid


def dwconv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, dilation: int = 1
) -> torch.Tensor:
    """Same-padded depthwise conv of ``x`` ``[B, C, H, W]`` with ``weight`` ``[C, k*k]`` and ``bias`` ``[C]``
    or None."""
    bsz, chans, h, w = x.shape
    k = int(round(weight.shape[1] ** 0.5))
    bh, bw = pow2_block(h, 32, floor=1), pow2_block(w, 64, floor=1)
    tiles_w = triton.cdiv(w, bw)
    n_planes = bsz * chans
    pb = _planes_per_program(n_planes, x.device)
    out = torch.empty_like(x)
    _dwconv_kernel[(triton.cdiv(n_planes, pb), triton.cdiv(h, bh) * tiles_w)](
        x,
        weight,
        bias if bias is not None else weight,
        out,
        n_planes,
        chans,
        h,
        w,
        tiles_w,
        K=k,
        DIL=dilation,
        HAS_BIAS=bias is not None,
        PB=pb,
        BLOCK_H=bh,
        BLOCK_W=bw,
        num_warps=_NUM_WARPS,
    )
    return out


def dwconv_weight_grad(
    x: torch.Tensor, grad: torch.Tensor, kernel_size: int, dilation: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of a same-padded depthwise conv w.r.t. its weight ``[C, k*k]`` (fp32) and bias ``[C]``
    (fp32), given its input ``x`` and output gradient ``grad`` (both ``[B, C, H, W]``)."""
    bsz, chans, h, w = x.shape
    bh, bw = pow2_block(h, 32, floor=1), pow2_block(w, 64, floor=1)
    tiles_w = triton.cdiv(w, bw)
    n_tiles = triton.cdiv(h, bh) * tiles_w
    n_planes = bsz * chans
    pb = _planes_per_program(n_planes, x.device)
    taps = kernel_size * kernel_size
    partial = torch.empty(bsz, chans, n_tiles, taps + 1, device=x.device, dtype=torch.float32)
    _dwconv_wgrad_kernel[(triton.cdiv(n_planes, pb), n_tiles)](
        x,
        grad,
        partial,
        n_planes,
        h,
        w,
        tiles_w,
        n_tiles,
        K=kernel_size,
        DIL=dilation,
        PB=pb,
        BLOCK_H=bh,
        BLOCK_W=bw,
        num_warps=_NUM_WARPS,
    )
    sums = partial.sum(dim=(0, 2))
    return sums[:, :taps].clone(), sums[:, taps].clone()


def pointwise_gate(
    w: torch.Tensor, bias: torch.Tensor | None, d: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """``x * (conv1x1(d, w) + bias)`` for ``d``, ``x`` ``[B, C, H, W]`` and ``w`` ``[C, C]`` (contiguous)."""
    bsz, chans, h, wd = x.shape
    hw = h * wd
    bm = pow2_block(chans, 64)
    bk = pow2_block(chans, 32)  # fp32 stages fit in ~72 KiB of shared memory
    bn = pow2_block(hw, 128)
    # fp32 follows the TF32 setting of the cuDNN 1x1 convolution this GEMM replaces
    tf32 = x.is_cuda and x.dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    precision = "tf32" if tf32 else "ieee"
    out = torch.empty_like(x)
    _pointwise_gate_kernel[(bsz, triton.cdiv(chans, bm), triton.cdiv(hw, bn))](
        w,
        bias if bias is not None else w,
        d,
        x,
        out,
        chans,
        hw,
        HAS_BIAS=bias is not None,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        PRECISION=precision,
        num_warps=_NUM_WARPS,
    )
    return out


def _flat(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1).contiguous()


def large_kernel_attention_forward(x, dw_weight, dw_bias, dwd_weight, dwd_bias, pw_weight, pw_bias, dilation):
    """``(x * attn, d)`` for ``x [B, C, H, W]``, ``d`` the two depthwise convs (kept for the backward);
    arguments as :func:`~visattn.kernels.large_kernel_attention` (``dilation`` an int)."""
    x = x.contiguous()
    dw_bias, dwd_bias, pw_bias = (
        b.contiguous() if b is not None else None for b in (dw_bias, dwd_bias, pw_bias)
    )
    d, _ = dw_chain(x, _flat(dw_weight), dw_bias, _flat(dwd_weight), dwd_bias, 1, dilation)
    return pointwise_gate(_flat(pw_weight), pw_bias, d, x), d


def large_kernel_attention_backward(
    grad_out, grad_d, x, d, dw_weight, dw_bias, dwd_weight, dwd_bias, pw_weight, pw_bias, dilation
):
    """Gradients for x, dw weight/bias, dwd weight/bias, pw weight/bias (biases always)."""
    batch, channels, height, width = x.shape
    x = x.contiguous()
    wpw = pw_weight.reshape(channels, channels)
    xf, df = x.reshape(batch, channels, -1), d.reshape(batch, channels, -1)
    gf = grad_out.contiguous().reshape(batch, channels, -1)
    attn = torch.matmul(wpw, df)
    if pw_bias is not None:
        attn += pw_bias[:, None]
    g_attn = gf * xf
    g_d = torch.matmul(wpw.t(), g_attn)
    if grad_d is not None:
        g_d = g_d + grad_d.reshape(batch, channels, -1)
    g_pw = torch.einsum("bip,bjp->ij", g_attn, df).reshape(pw_weight.shape)
    g_pw_bias = g_attn.sum(dim=(0, 2))
    g_d = g_d.reshape(x.shape).contiguous()

    # input gradients of the two depthwise convs: convs with the flipped kernels, in reverse order, in
    # one launch that adds the direct term grad * attn and keeps g_a for the first conv's weight gradient
    w1_t, w2_t = _flat(dw_weight.flip((-2, -1))), _flat(dwd_weight.flip((-2, -1)))
    g_x, g_a = dw_chain(g_d, w2_t, None, w1_t, None, dilation, 1, add=attn.mul_(gf), keep_mid=True)
    a = dwconv(x, _flat(dw_weight), dw_bias.contiguous() if dw_bias is not None else None)
    g_w2, g_b2 = dwconv_weight_grad(a, g_d, dwd_weight.shape[-1], dilation)
    g_w1, g_b1 = dwconv_weight_grad(x, g_a, dw_weight.shape[-1])
    wdt = dw_weight.dtype
    return (
        g_x,
        g_w1.to(wdt).reshape(dw_weight.shape),
        g_b1.to(wdt),
        g_w2.to(wdt).reshape(dwd_weight.shape),
        g_b2.to(wdt),
        g_pw.to(wdt),
        g_pw_bias.to(wdt),
    )
