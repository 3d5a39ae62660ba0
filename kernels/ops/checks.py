"""Argument validation shared by the ops: every failure is a ``ValueError`` naming the problem."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Attention logits saturate at +-LOGIT_LIMIT (every backend), so any finite scale gives finite outputs.
LOGIT_LIMIT = 1.0e30
# The SDPA-based ``torch`` paths run up to this scale; beyond it their unclamped logits could overflow,
# and the reference, which saturates them at LOGIT_LIMIT, runs instead.
MAX_SDPA_SCALE = 1.0e4


def as_tuple(value, n: int, name: str, kind: type = int) -> tuple:
    """Broadcast an int/bool or a length-``n`` sequence to an ``n``-tuple of ``kind``."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n:
            raise ValueError(
                f"{name} needs {n} values (one per spatial dim), got {len(value)}: {tuple(value)}"
            )
        values = tuple(value)
    else:
        values = (value,) * n
    for v in values:
        if kind is bool:
            if not isinstance(v, bool):
                raise ValueError(f"{name} must be a bool or a tuple of bools, got {value!r}")
        elif isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be an int or a tuple of ints, got {value!r}")
    return values


def check_float_tensors(op: str, **tensors: torch.Tensor) -> None:
    """All tensors are floating point of one dtype, on one device."""
    first_name, first = next(iter(tensors.items()))
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{op}: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")
        if t.dtype != first.dtype:
            raise ValueError(f"{op}: {name} has dtype {t.dtype} but {first_name} has {first.dtype}")
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}")


def check_same_shape(op: str, **tensors: torch.Tensor) -> None:
    """All tensors have exactly the same shape."""
    first_name, first = next(iter(tensors.items()))
    for name, t in tensors.items():
        if t.shape != first.shape:
            raise ValueError(
                f"{op}: {name} has shape {tuple(t.shape)} but {first_name} has {tuple(first.shape)}"
            )


def check_ndim(op: str, name: str, t: torch.Tensor, allowed: Sequence[int], layout: str) -> None:
    """``t.ndim`` is one of ``allowed``; the message shows the expected ``layout``."""
    if t.ndim not in allowed:
        raise ValueError(
            f"{op}: {name} must be laid out as {layout} ({' or '.join(map(str, allowed))}-D), "
            f"got shape {tuple(t.shape)}"
        )


def softmax_scale(op: str, scale, head_dim: int) -> float:
    """``scale`` as a float, ``head_dim ** -0.5`` when None; anything but a positive finite number raises.

    The one scale rule of every op. Symbolic values (``torch.compile(dynamic=True)``) pass unchecked:
    reading them would specialise the graph on them."""
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, (torch.SymInt, torch.SymFloat)):
        return scale
    is_number = isinstance(scale, (int, float)) and not isinstance(scale, bool)
    if not is_number or not math.isfinite(scale) or scale <= 0:
        raise ValueError(
            f"{op}: scale must be a positive finite number or None (head_dim ** -0.5), got {scale!r}"
        )
    return float(scale)


def check_attention_args(op, q, k, v, attn_mask, causal, scale) -> float:
    """Shared checks of ``[B, N, H, D]`` q/k/v (GQA allowed), mask and scale; returns the scale."""
    check_float_tensors(op, q=q, k=k, v=v)
    check_ndim(op, "q", q, (4,), "[batch, tokens, heads, head_dim]")
    check_ndim(op, "k", k, (4,), "[batch, kv_tokens, kv_heads, head_dim]")
    check_ndim(op, "v", v, (4,), "[batch, kv_tokens, kv_heads, v_head_dim]")
    batch, nq, heads, dim = q.shape
    if k.shape[0] != batch or k.shape[3] != dim or k.shape[2] == 0 or heads % k.shape[2] != 0:
        raise ValueError(
            f"{op}: k must be [batch={batch}, kv_tokens, kv_heads, head_dim={dim}] with heads={heads} a "
            f"multiple of kv_heads, got {tuple(k.shape)}"
        )
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"{op}: v must share k's first three dims {tuple(k.shape[:3])}, got {tuple(v.shape)}"
        )
    nk = k.shape[1]
    if min(nq, nk, dim, v.shape[3]) == 0:
        raise ValueError(f"{op}: empty input: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not isinstance(causal, bool):
        raise ValueError(f"{op}: causal must be a bool, got {causal!r}")
    if causal and nk < nq:
        raise ValueError(f"{op}: causal attention needs kv_tokens >= tokens, got {nk} < {nq}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor) or attn_mask.ndim != 4:
            raise ValueError(
                f"{op}: attn_mask must be a 4-D tensor [batch or 1, heads or 1, {nq} or 1, {nk}]"
            )
        b, h, mq, mk = attn_mask.shape
        if b not in (1, batch) or h not in (1, heads) or mq not in (1, nq) or mk != nk:
            raise ValueError(
                f"{op}: attn_mask must have shape [batch or 1, heads or 1, {nq} or 1, {nk}] (1: the same "
                f"row for every query, e.g. key padding), got {tuple(attn_mask.shape)}"
            )
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise ValueError(
                f"{op}: attn_mask must be bool (True = attend) or float (additive), got {attn_mask.dtype}"
            )
        if attn_mask.device != q.device:
            raise ValueError(f"{op}: attn_mask is on {attn_mask.device} but q is on {q.device}")
    return softmax_scale(op, scale, dim)
