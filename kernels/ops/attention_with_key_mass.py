"""Attention that also returns the attention mass each key received (FastV / VTC-CLS style scoring).

``out = softmax(q k^T * scale + mask) v`` as usual, plus for every key ``j``::

    mass[b, j] = mean over heads h of  sum_i w[b, i] * P[b, h, i, j]

where ``w`` selects the queries whose attention counts: ``query_set="all"`` (mean over all queries,
the FastV paper's "average attention received"), ``"last"`` (the last query only, what the official
FastV code ranks by), or a boolean ``[B, Nq]`` tensor (mean over the marked queries, e.g. the text
tokens). The Triton backend is flash-style (online softmax, then a second pass over the selected
queries using the stored log-sum-exp); neither backend materialises the ``[Nq, Nk]`` matrix of all
queries. ``backend="auto"`` with only a short suffix of selected queries (``"last"``: FastV's
official scoring) takes the output from ``torch.nn.functional.scaled_dot_product_attention`` (its
flash/cuDNN kernels) and scores those few rows directly, so scoring costs about one SDPA call.
Forward only: no method trains through this op.
"""

from __future__ import annotations

import torch

from visattn.kernels.ops.checks import check_attention_args
from visattn.kernels.ops.dispatch import resolve_backend, triton_limit
from visattn.kernels.reference.attention_with_key_mass import additive_mask, attention_with_key_mass_reference
from visattn.kernels.torch.attention_with_key_mass import attention_with_key_mass_torch, suffix_path_applies

OP = "attention_with_key_mass"
QUERY_SETS = ("all", "last")


def query_weights(op: str, query_set, batch: int, nq: int, device: torch.device) -> torch.Tensor:
    """``[B, Nq]`` float32 weights: a mean over the selected queries."""
    if isinstance(query_set, str):
        if query_set not in QUERY_SETS:
            raise ValueError(
                f"{op}: query_set must be one of {QUERY_SETS} or a bool [batch, tokens] tensor, "
                f"got {query_set!r}"
            )
        w = torch.zeros(batch, nq, dtype=torch.float32, device=device)
        if query_set == "all":
            w += 1.0 / nq
        else:
            w[:, -1] = 1.0
        return w
    if (
        not isinstance(query_set, torch.Tensor)
        or query_set.dtype != torch.bool
        or tuple(query_set.shape)
        != (
            batch,
            nq,
        )
    ):
        got = tuple(query_set.shape) if isinstance(query_set, torch.Tensor) else type(query_set).__name__
        raise ValueError(f"{op}: a query_set tensor must be bool of shape [{batch}, {nq}], got {got}")
    w = query_set.to(device=device, dtype=torch.float32)
    return w / w.sum(dim=1, keepdim=True).clamp_min(1.0)


@torch.library.custom_op("visattn::attention_with_key_mass_fwd", mutates_args=())
def _triton_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_weight: torch.Tensor,
    bias: torch.Tensor | None,
    causal: bool,
    scale: float,
    q_lo: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward: ``out [B, Nq, H, Dv]`` and ``mass [B, Nk]`` float32 (no backward: nothing trains
    through this op)."""
    from visattn.kernels.triton.attention_with_key_mass import attention_with_key_mass_forward

    return attention_with_key_mass_forward(q, k, v, query_weight, bias, causal, scale, q_lo)


@_triton_fwd.register_fake
def _(q, k, v, query_weight, bias, causal, scale, q_lo):
    out = q.new_empty(*q.shape[:3], v.shape[3])
    return out, q.new_empty(k.shape[0], k.shape[1], dtype=torch.float32)


def attention_with_key_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    query_set: str | torch.Tensor = "all",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and the head-averaged attention mass each key received.

    Args:
        q: ``[B, Nq, H, D]``; k: ``[B, Nk, Hkv, D]``; v: ``[B, Nk, Hkv, Dv]`` (``H`` a multiple of ``Hkv``).
        attn_mask: bool (True = attend) or additive float, ``[B or 1, H or 1, Nq or 1, Nk]`` (a single
            row applies to every query: key padding, combined with ``causal`` when set).
        causal: causal mask aligned bottom-right (queries are the last ``Nq`` of the ``Nk`` positions).
        scale: default ``D ** -0.5``.
        query_set: ``"all"``, ``"last"`` or a bool ``[B, Nq]`` tensor of the queries to count.
        backend: ``"auto"`` (a short suffix of selected queries: ``"torch"``; else Triton on CUDA,
            ``"torch"`` elsewhere), ``"triton"``, ``"torch"`` (SDPA output + the selected rows scored
            directly when they are a suffix of at most ``SUFFIX_ROWS`` = 128 queries and ``scale`` is at most
            ``MAX_SDPA_SCALE``, else the reference)
            or ``"reference"``.

    Returns:
        ``out [B, Nq, H, Dv]`` (dtype of q) and ``mass [B, Nk]`` float32, the mean over the selected
        queries and over heads of the attention probabilities (sums to 1 over keys). A (head, query) row
        whose keys are all masked (bool False, additive ``-inf`` or causality) has a zero output and
        gives no mass, on every backend, so the mass then sums to the share of live rows.
    """
    scale = check_attention_args(OP, q, k, v, attn_mask, causal, scale)
    which = resolve_backend(backend, q, k, v, op=OP, limit=triton_limit(q.dtype))
    weight = query_weights(OP, query_set, q.shape[0], q.shape[1], q.device)
    nz = weight.sum(0).nonzero()
    q_lo = int(nz[0]) if nz.numel() else q.shape[1]
    bias = additive_mask(attn_mask)
    if which == "triton" and backend == "auto" and suffix_path_applies(q.shape[1], q_lo, scale):
        which = "torch"  # SDPA's flash / cuDNN kernels beat the second pass for a few rows
    if which == "triton":
        return _triton_fwd(q, k, v, weight, bias, causal, scale, q_lo)
    if which == "torch":
        return attention_with_key_mass_torch(q, k, v, weight, bias, causal, scale, q_lo)
    return attention_with_key_mass_reference(q, k, v, weight, bias, causal, scale)
