"""Bi-level routing attention (BRA) of BiFormer (Zhu et al., CVPR 2023, arXiv 2303.08810).

``bilevel_routing_attention(q, k, v, num_regions, topk)`` routes every query
region of an ``S x S`` region grid to its ``topk`` most related key regions
(region affinity of the per-region mean queries and keys, shared by all heads)
and lets each query token attend, with one softmax, to every token of those
regions. The routing is computed in PyTorch (it is tiny); the attention runs in
Triton as block-sparse flash attention that reads the routed K/V regions by index
inside its loop, so the gathered K/V (``topk`` copies of K and V) never exist in
memory. ``backend="torch"`` runs one batched SDPA over the routed tokens (gathered once, or the whole
map under the routing mask when top-k covers many regions; :mod:`.bilevel_routing_attention_torch`),
checked against the readable reference.
"""

from __future__ import annotations

import torch

from visattn.kernels.ops.checks import check_float_tensors, check_ndim, softmax_scale
from visattn.kernels.ops.dispatch import resolve_backend, triton_limit
from visattn.kernels.reference.bilevel_routing_attention import (
    bilevel_routing_attention_reference,
    region_grid,
    routing_indices,
)
from visattn.kernels.torch.bilevel_routing_attention import bilevel_routing_attention_torch

OP = "bilevel_routing_attention"
LAYOUT = "[batch, H, W, heads, head_dim]"
MAX_TRITON_HEAD_DIM = 256


def _check_args(q, k, v, num_regions, topk, scale) -> float:
    """Validate the arguments; returns the softmax scale."""
    check_float_tensors(OP, q=q, k=k, v=v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_ndim(OP, name, t, (5,), LAYOUT)
    if k.shape != q.shape:
        raise ValueError(f"{OP}: k has shape {tuple(k.shape)} but q has {tuple(q.shape)}")
    if v.shape[:4] != q.shape[:4]:
        raise ValueError(
            f"{OP}: v must share [batch, H, W, heads] with q {tuple(q.shape[:4])}, got {tuple(v.shape)}"
        )
    if min(q.shape) == 0:
        raise ValueError(f"{OP}: empty input of shape {tuple(q.shape)}")
    if isinstance(num_regions, bool) or not isinstance(num_regions, int) or num_regions < 1:
        raise ValueError(f"{OP}: num_regions must be a positive int, got {num_regions!r}")
    if isinstance(topk, bool) or not isinstance(topk, int) or (topk < 1 and topk != -1):
        raise ValueError(f"{OP}: topk must be a positive int or -1 (all regions), got {topk!r}")
    return softmax_scale(OP, scale, q.shape[-1])


@torch.library.custom_op("visattn::bilevel_routing_attention_fwd", mutates_args=())
def _triton_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routing: torch.Tensor, num_regions: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward: ``out [B, H, W, heads, dv]`` and log-sum-exp ``[B, heads, H, W]`` (float32)."""
    from visattn.kernels.triton.bilevel_routing_attention import bilevel_routing_attention_forward

    return bilevel_routing_attention_forward(q, k, v, routing, num_regions, scale)


@_triton_fwd.register_fake
def _(q, k, v, routing, num_regions, scale):
    b, h, w, heads = q.shape[:4]
    return v.new_empty(v.shape), q.new_empty((b, heads, h, w), dtype=torch.float32)


@torch.library.custom_op("visattn::bilevel_routing_attention_bwd", mutates_args=())
def _triton_bwd(
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
    """Triton backward: gradients of q, k, v (same shapes)."""
    from visattn.kernels.triton.bilevel_routing_attention import bilevel_routing_attention_backward

    return bilevel_routing_attention_backward(do, q, k, v, out, lse, routing, num_regions, scale)


@_triton_bwd.register_fake
def _(do, q, k, v, out, lse, routing, num_regions, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, routing, num_regions, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, routing)
    ctx.num_regions = num_regions
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, routing = ctx.saved_tensors
    dq, dk, dv = _triton_bwd(dout, q, k, v, out, lse, routing, ctx.num_regions, ctx.scale)
    return dq, dk, dv, None, None, None


_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


def bilevel_routing_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_regions: int,
    topk: int,
    scale: float | None = None,
    return_routing: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Bi-level routing attention.

    Args:
        q, k: ``[batch, H, W, heads, head_dim]``; v: ``[batch, H, W, heads, head_dim_v]``.
        num_regions: regions per side ``S`` (the map is split into ``S x S`` regions).
        topk: key regions each query region attends to; ``-1`` or ``>= S*S`` means all.
        scale: softmax scale, default ``head_dim ** -0.5`` (BiFormer passes ``qk_dim ** -0.5``).
            The routing affinity is ``(q_r * scale) @ k_r^T`` over all heads' channels.
        return_routing: also return the routing indices ``[batch, S*S, min(topk, S*S)]``
            (regions numbered row-major, ordered by decreasing affinity).
        backend: ``"auto"`` (Triton on CUDA, else ``"torch"``), ``"triton"``, ``"torch"`` (one batched
        SDPA) or ``"reference"``.

    H, W need not be multiples of ``S`` and may be smaller than ``S``: the map is padded
    to ``S * ceil(H / S)`` (resp. W), and padded tokens neither count in the region means
    nor receive attention; regions without real tokens are routed after all real ones, so
    every query attends to at least one real key. Returns ``[batch, H, W, heads, head_dim_v]``
    (and the routing).
    """
    scale = _check_args(q, k, v, num_regions, topk, scale)
    limit = triton_limit(q.dtype, (q.shape[-1], v.shape[-1]), MAX_TRITON_HEAD_DIM)
    rh, rw = region_grid(*q.shape[1:3], num_regions)
    rows = q.shape[0] * q.shape[3] * num_regions**2 * rh * rw  # the kernels' flat int32 row space
    if limit is None and rows >= 2**31:
        limit = f"supports batch * heads * padded H * W < 2**31, got {rows}"
    chosen = resolve_backend(backend, q, k, v, op=OP, limit=limit)
    routing = routing_indices(q, k, num_regions, topk, scale)
    if chosen == "reference":
        out = bilevel_routing_attention_reference(q, k, v, routing, num_regions, scale)
    elif chosen == "torch":
        out = bilevel_routing_attention_torch(q, k, v, routing, num_regions, scale)
    else:
        out = _triton_fwd(q, k, v, routing, num_regions, scale)[0]
    return (out, routing) if return_routing else out
