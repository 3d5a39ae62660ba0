"""Attention with visual-sink redistribution (VAR: Kang, Kim, Kim, Hwang, "See What You Are Told:
Visual Attention Sink in Large Multimodal Models", ICLR 2025; official code MICV-yonsei/VisAttnSink).

Keys carry a category (``0`` other, ``1`` text sink, ``2`` visual sink, ``3`` non-sink image token).
For every (head, query) row whose query is marked in ``query_mask`` and that is *image-centric*
(attention to image tokens ``>= min_image_attention`` and non-sink share of it ``>= rho``), each sink
keeps ``1 - fraction`` of its probability and the freed budget is given to the non-sink image tokens
in proportion to their probabilities (rows keep summing to one). Other rows are plain attention.

The Triton backend does this in one flash-style pass (separate accumulators per key category,
recombined at the end); the reference forms the probabilities chunk by chunk. Forward only.
"""

from __future__ import annotations

import math

import torch

from visattn.kernels.ops.checks import check_attention_args
from visattn.kernels.ops.dispatch import resolve_backend, triton_limit
from visattn.kernels.reference.attention_with_key_mass import additive_mask
from visattn.kernels.reference.visual_sink_attention import visual_sink_attention_reference

OP = "visual_sink_attention"


def _check_fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{OP}: {name} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{OP}: {name} must be in [0, 1], got {value}")
    return float(value)


@torch.library.custom_op("visattn::visual_sink_attention_fwd", mutates_args=())
def _triton_fwd(
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
    """Triton forward: ``[B, Nq, H, Dv]`` (no backward: nothing trains through this op)."""
    from visattn.kernels.triton.visual_sink_attention import visual_sink_attention_forward

    return visual_sink_attention_forward(
        q, k, v, category, query_mask, fraction, rho, min_image_attention, bias, causal, scale
    )


@_triton_fwd.register_fake
def _(q, k, v, category, query_mask, fraction, rho, min_image_attention, bias, causal, scale):
    return q.new_empty(*q.shape[:3], v.shape[3])


def visual_sink_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    category: torch.Tensor,
    query_mask: torch.Tensor,
    fraction: float = 0.4,
    rho: float = 0.5,
    min_image_attention: float = 0.2,
    attn_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax attention with VAR's sink-to-image redistribution.

    Args:
        q: ``[B, Nq, H, D]``; k: ``[B, Nk, Hkv, D]``; v: ``[B, Nk, Hkv, Dv]``.
        category: ``[B, Nk]`` integer key categories (0 other, 1 text sink, 2 visual sink, 3 image).
        query_mask: ``[B, Nq]`` bool, the queries whose rows may be redistributed.
        fraction: share of the sink attention moved to image tokens (official code keeps ``p=0.6``,
            i.e. moves 0.4). rho: minimum non-sink share of the image attention (0.5).
        min_image_attention: minimum attention to image tokens of a row (official ``summ=0.2``).
        attn_mask / causal / scale: as in :func:`attention_with_key_mass`.
        backend: ``"auto"`` (Triton on CUDA, ``"torch"`` elsewhere), ``"triton"``, ``"torch"`` or
            ``"reference"`` (both the chunked reference: no faster PyTorch path exists).

    Returns:
        ``[B, Nq, H, Dv]`` in q's dtype.
    """
    scale = check_attention_args(OP, q, k, v, attn_mask, causal, scale)
    batch, nq, nk = q.shape[0], q.shape[1], k.shape[1]
    if (
        not isinstance(category, torch.Tensor)
        or tuple(category.shape) != (batch, nk)
        or category.is_floating_point()
    ):
        got = tuple(category.shape) if isinstance(category, torch.Tensor) else type(category).__name__
        raise ValueError(f"{OP}: category must be an integer tensor of shape [{batch}, {nk}], got {got}")
    if (
        not isinstance(query_mask, torch.Tensor)
        or query_mask.dtype != torch.bool
        or tuple(query_mask.shape)
        != (
            batch,
            nq,
        )
    ):
        got = tuple(query_mask.shape) if isinstance(query_mask, torch.Tensor) else type(query_mask).__name__
        raise ValueError(f"{OP}: query_mask must be a bool tensor of shape [{batch}, {nq}], got {got}")
    if category.numel() and (int(category.min()) < 0 or int(category.max()) > 3):
        raise ValueError(f"{OP}: category values must be 0 (other), 1, 2 (text/visual sink) or 3 (image)")
    fraction = _check_fraction("fraction", fraction)
    rho = _check_fraction("rho", rho)
    min_image_attention = _check_fraction("min_image_attention", min_image_attention)
    which = resolve_backend(backend, q, k, v, op=OP, limit=triton_limit(q.dtype))
    category = category.to(device=q.device, dtype=torch.int8)
    query_mask = query_mask.to(q.device)
    args = (q, k, v, category, query_mask, fraction, rho, min_image_attention, additive_mask(attn_mask))
    if which == "triton":
        return _triton_fwd(*args, causal, scale)
    return visual_sink_attention_reference(*args, causal, scale)
