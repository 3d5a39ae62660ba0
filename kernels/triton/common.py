"""Triton building blocks shared by the attention kernels of :mod:`visattn.kernels`.

Softmax runs in base 2 (``exp2``/``log2``): callers multiply logits by ``LOG2E`` once and
store the log-sum-exp in log2 units, which the backward passes feed back to ``exp2``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from visattn.kernels.ops.checks import LOGIT_LIMIT as _LOGIT_LIMIT

# constexpr so that jitted kernels can read it; ``LOG2E.value`` on the host.
LOG2E = tl.constexpr(1.4426950408889634)
# logits of unmasked keys are clamped to +-LOGIT_LIMIT, as in the references
LOGIT_LIMIT = tl.constexpr(_LOGIT_LIMIT)


@triton.jit
def online_softmax_step(m_i, l_i, s):
    """One block of an online softmax over the columns of ``s``.

    ``m_i``/``l_i`` ``[BLOCK_M]``: running row max and row sum (base 2); ``s`` ``[BLOCK_M, BLOCK_N]``:
    logits in log2 units with masked entries at ``-inf``. Returns ``(m_new, l_new, alpha, p)``: the
    updated statistics, the factor ``alpha`` to rescale the running accumulator with, and the
    unnormalised probabilities ``p``. Rows whose entries are all ``-inf`` so far stay at
    ``m = -inf, l = 0`` without producing NaNs.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_new = l_i * alpha + tl.sum(p, 1)
    return m_new, l_new, alpha, p


@triton.jit
def finish_softmax(acc, m_i, l_i):
    """Normalise the accumulator and return ``(out, lse)``, the log-sum-exp in log2 units."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    return acc / l_safe[:, None], m_i + tl.log2(l_safe)


@triton.jit
def load_tile(ptr, rows, cols, stride_row, stride_col, row_ok, n_cols):
    """``[len(rows), len(cols)]`` tile of a strided matrix at ``ptr``, zero where ``row_ok`` is False
    or the column is ``>= n_cols`` (a q/k/v tile: token rows, head-dim columns)."""
    return tl.load(
        ptr + rows[:, None] * stride_row + cols[None, :] * stride_col,
        mask=row_ok[:, None] & (cols[None, :] < n_cols),
        other=0.0,
    )


@triton.jit
def attention_logits(
    q, k, bias_ptr, offs_m, offs_n, m_ok, n_ok, sbq, sbk, scale, NQ, NK,
    HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Logits of a ``[BLOCK_M, BLOCK_N]`` tile in log2 units: ``scale * q k^T`` plus the additive bias tile at
    ``bias_ptr`` (strides ``sbq``, ``sbk``) when ``HAS_BIAS``, clamped to ``[-LOGIT_LIMIT, LOGIT_LIMIT]``;
    ``-inf`` for masked keys: outside ``n_ok``, a ``-inf`` bias and, when ``CAUSAL``, above the
    bottom-right aligned diagonal (query ``i`` sees keys ``<= i + NK - NQ``). The masking rule of
    :mod:`visattn.kernels.reference.attention_with_key_mass`."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    valid = n_ok[None, :]
    if HAS_BIAS:
        bias = tl.load(
            bias_ptr + offs_m[:, None] * sbq + offs_n[None, :] * sbk,
            mask=m_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        s += bias
        valid = valid & (bias != float("-inf"))
    s = tl.minimum(tl.maximum(s, -LOGIT_LIMIT), LOGIT_LIMIT)
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None] + (NK - NQ))
    return tl.where(valid, s * LOG2E, float("-inf"))


def pow2_block(n: int, cap: int | None = None, floor: int = 16) -> int:
    """The block that covers ``n``: its next power of two, at least ``floor`` (``tl.dot`` needs 16), at
    most ``cap``. Every kernel family rounds its block sizes with this; the caps are its own."""
    block = max(floor, triton.next_power_of_2(n))
    return block if cap is None else min(block, cap)


def broadcast_strides(t: torch.Tensor | None) -> tuple[int, ...]:
    """Strides of a 4-D tensor (a bias or mask) with 0 on its size-1 (broadcast) dims; zeros for None."""
    if t is None:
        return (0, 0, 0, 0)
    return tuple(0 if t.shape[i] == 1 else t.stride(i) for i in range(t.ndim))


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact fp32 products for float32 inputs (no TF32), default otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"
