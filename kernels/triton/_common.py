"""Triton building blocks shared by the attention kernels of :mod:`visattn.kernels`.

Softmax runs in base 2 (``exp2``/``log2``): callers multiply logits by ``LOG2E`` once and
store the log-sum-exp in log2 units, which the backward passes feed back to ``exp2``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# constexpr so that jitted kernels can read it; ``LOG2E.value`` on the host.
LOG2E = tl.constexpr(1.4426950408889634)


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


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact fp32 products for float32 inputs (no TF32), default otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"
