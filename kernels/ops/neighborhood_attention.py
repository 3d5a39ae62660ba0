"""Neighborhood attention (NAT, DiNAT, NATTEN) in 1-D, 2-D and 3-D.

``neighborhood_attention(q, k, v, kernel_size, dilation, is_causal, rpb, scale)`` with
``q, k, v`` laid out ``[batch, *spatial, heads, head_dim]`` (NATTEN's heads-last layout).
Each query attends to the ``kernel_size`` nearest keys of its dilation group along every
spatial dim (window shifted at the borders); see
:mod:`visattn.kernels.reference.neighborhood_attention` for the exact rule. ``rpb`` is NAT's
relative positional bias ``[heads, 2k_1 - 1, ...]`` (NATTEN <= 0.17 semantics; NATTEN 0.20
dropped it), added after scaling: ``softmax(scale * q k^T + rpb) v``.

The Triton path is registered as ``torch.ops.visattn.neighborhood_attention_fwd`` / ``_bwd``
(``torch.library.custom_op`` with fake and autograd registrations) so it traces under
``torch.compile``; its forward stores only the log-sum-exp per query for the backward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from visattn.kernels.ops.checks import (
    MAX_SDPA_SCALE,
    as_tuple,
    check_float_tensors,
    check_ndim,
    check_same_shape,
    softmax_scale,
)
from visattn.kernels.ops.dispatch import resolve_backend, triton_limit
from visattn.kernels.reference.neighborhood_attention import neighborhood_attention_reference
from visattn.kernels.torch.neighborhood_attention import neighborhood_attention_torch

__all__ = ["neighborhood_attention"]

OP = "neighborhood_attention"
LAYOUT = "[batch, *spatial, heads, head_dim] with 1-3 spatial dims"
MAX_TRITON_HEAD_DIM = 256


def _check_args(q, k, v, kernel_size, dilation, is_causal, rpb, scale):
    check_float_tensors(OP, q=q, k=k, v=v)
    check_ndim(OP, "q", q, (4, 5, 6), LAYOUT)
    check_same_shape(OP, q=q, k=k, v=v)
    spatial = tuple(q.shape[1:-2])
    n = len(spatial)
    kernel_size = as_tuple(kernel_size, n, "kernel_size")
    dilation = as_tuple(dilation, n, "dilation")
    is_causal = as_tuple(is_causal, n, "is_causal", bool)
    for length, ks, dil in zip(spatial, kernel_size, dilation):
        if ks < 1 or dil < 1:
            raise ValueError(f"{OP}: kernel_size and dilation must be >= 1, got {kernel_size}, {dilation}")
        if ks * dil > length:
            raise ValueError(
                f"{OP}: kernel_size * dilation must not exceed the spatial extent in every dim, got "
                f"kernel_size={kernel_size}, dilation={dilation} for spatial shape {spatial}"
            )
    if rpb is not None:
        if not isinstance(rpb, torch.Tensor) or not rpb.is_floating_point():
            got = getattr(rpb, "dtype", type(rpb).__name__)
            raise ValueError(f"{OP}: rpb must be a floating-point tensor, got {got}")
        if rpb.device != q.device:
            raise ValueError(f"{OP}: rpb is on {rpb.device} but q is on {q.device}")
        if any(is_causal):
            raise ValueError(
                f"{OP}: rpb cannot be combined with is_causal (NATTEN never defined relative positional "
                "biases for causal neighborhoods)"
            )
        if any(ks % 2 == 0 for ks in kernel_size):
            raise ValueError(f"{OP}: rpb needs odd kernel sizes, got kernel_size={kernel_size}")
        expected = (q.shape[-2], *(2 * ks - 1 for ks in kernel_size))
        if tuple(rpb.shape) != expected:
            raise ValueError(
                f"{OP}: rpb must have shape [heads, 2*k-1 per dim] = {expected}, got {tuple(rpb.shape)}"
            )
    return kernel_size, dilation, is_causal, softmax_scale(OP, scale, q.shape[-1])


def neighborhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int | Sequence[int],
    dilation: int | Sequence[int] = 1,
    is_causal: bool | Sequence[bool] = False,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Neighborhood attention over 1-3 spatial dims.

    Args:
        q, k, v: ``[batch, *spatial, heads, head_dim]``, one float dtype, one device.
        kernel_size: window size per spatial dim (int or tuple); ``kernel_size * dilation``
            must not exceed the extent of that dim.
        dilation: dilation per dim (DiNAT); positions are split into groups by ``index % dilation``.
        is_causal: per dim, attend only to keys at or before the query.
        rpb: optional NAT relative positional bias ``[heads, 2k_1 - 1, ...]`` (odd kernels,
            not causal); any float dtype, cast to the compute precision.
        scale: multiplies ``q . k`` before ``rpb`` is added; defaults to ``head_dim ** -0.5``.
        backend: ``"auto"`` (Triton on CUDA, ``"torch"`` elsewhere), ``"triton"``, ``"torch"`` (query
            tiles with their key halo through SDPA, :mod:`visattn.kernels.torch.neighborhood_attention`;
            exact) or
            ``"reference"`` (one gathered window per query).

    Returns:
        ``[batch, *spatial, heads, head_dim]`` in the dtype of ``q``.
    """
    kernel_size, dilation, is_causal, scale = _check_args(
        q, k, v, kernel_size, dilation, is_causal, rpb, scale
    )
    tensors = (q, k, v) if rpb is None else (q, k, v, rpb)
    limit = triton_limit(q.dtype, (q.shape[-1],), MAX_TRITON_HEAD_DIM, grid_axis=q.shape[0] * q.shape[-2])
    backend = resolve_backend(backend, *tensors, op=OP, limit=limit)
    if backend in ("torch", "reference"):
        args = (q, k, v, kernel_size, dilation, is_causal, rpb, scale)
        if backend == "reference" or not isinstance(scale, float) or scale > MAX_SDPA_SCALE:
            return neighborhood_attention_reference(*args)  # saturates the logits of a huge scale
        return neighborhood_attention_torch(*args)
    out, _ = torch.ops.visattn.neighborhood_attention_fwd(
        q, k, v, rpb, list(kernel_size), list(dilation), list(is_causal), scale
    )
    return out


# --------------------------------------------------------------------------- torch.library registration


@torch.library.custom_op("visattn::neighborhood_attention_fwd", mutates_args=())
def _triton_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rpb: torch.Tensor | None,
    kernel_size: list[int],
    dilation: list[int],
    is_causal: list[bool],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward: ``(out [batch, *spatial, heads, head_dim], lse [batch, heads, tokens] fp32)``."""
    from visattn.kernels.triton.neighborhood_attention import neighborhood_attention_forward

    return neighborhood_attention_forward(
        q, k, v, rpb, tuple(kernel_size), tuple(dilation), tuple(is_causal), scale
    )


@_triton_fwd.register_fake
def _(q, k, v, rpb, kernel_size, dilation, is_causal, scale):
    tokens = math.prod(q.shape[1:-2])
    lse = q.new_empty((q.shape[0], q.shape[-2], tokens), dtype=torch.float32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse


@torch.library.custom_op("visattn::neighborhood_attention_bwd", mutates_args=())
def _triton_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rpb: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    kernel_size: list[int],
    dilation: list[int],
    is_causal: list[bool],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward: ``(dq, dk, dv, drpb)``; ``drpb`` is empty when ``rpb`` is ``None``."""
    from visattn.kernels.triton.neighborhood_attention import neighborhood_attention_backward

    return neighborhood_attention_backward(
        grad_out, q, k, v, rpb, out, lse, tuple(kernel_size), tuple(dilation), tuple(is_causal), scale
    )


@_triton_bwd.register_fake
def _(grad_out, q, k, v, rpb, out, lse, kernel_size, dilation, is_causal, scale):
    drpb = q.new_empty((0,)) if rpb is None else torch.empty_like(rpb, memory_format=torch.contiguous_format)
    grads = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    return (*grads, drpb)


def _setup_context(ctx, inputs, output):
    q, k, v, rpb, kernel_size, dilation, is_causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, rpb, out, lse)
    ctx.args = (kernel_size, dilation, is_causal, scale)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, rpb, out, lse = ctx.saved_tensors
    dq, dk, dv, drpb = torch.ops.visattn.neighborhood_attention_bwd(
        grad_out.contiguous(), q, k, v, rpb, out, lse, *ctx.args
    )
    return dq, dk, dv, (None if rpb is None else drpb), None, None, None, None


_triton_fwd.register_autograd(_backward, setup_context=_setup_context)
