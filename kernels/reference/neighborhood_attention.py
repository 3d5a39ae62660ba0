"""Readable PyTorch neighborhood attention (NAT / DiNAT / NATTEN semantics): the ground truth.

Window rule, per spatial dim of extent ``L`` with kernel size ``k`` and dilation ``d``
(NATTEN 0.17 ``get_window_start`` / ``get_pb_start``, which 0.20+ keeps for the window):

* positions split into ``d`` dilation groups by ``index % d``; group ``r`` holds
  ``G = ceil((L - r) / d)`` positions, and a query at ``index`` sits at group coordinate
  ``g = index // d``;
* non-causal: the window is the ``k`` group coordinates starting at
  ``clamp(g - k // 2, 0, G - k)`` (shifted at the borders, never padded, so every query
  sees exactly ``k`` keys);
* causal: the keys ``max(g - k + 1, 0) .. g`` (the ``k`` keys ending at the query,
  truncated at the start);
* relative position bias: key at group coordinate ``j`` gets ``rpb[..., j - g + k - 1]``
  (for clamped windows this is NATTEN's "pb start" rule).

A query then attends over the product of the per-dim windows. Nothing here builds an
``N x N`` matrix: keys are gathered per query in chunks, so memory grows with
``N * prod(kernel_size)``.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from visattn.kernels.ops.checks import LOGIT_LIMIT

# Elements of the gathered key/value chunk ([batch, chunk, window, heads, head_dim]) per step.
_CHUNK_ELEMENTS = 1 << 24


def window_indices(
    length: int, kernel_size: int, dilation: int, is_causal: bool, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Neighbourhood of every position along one dim.

    Returns ``(key, valid, rel)``, each ``[length, kernel_size]``: the key position of each
    window slot, whether the slot is used (causal windows near the start are shorter; unused
    slots point at the query itself), and the relative-position-bias index ``j - g + k - 1``.
    """
    index = torch.arange(length, device=device)
    group, residue = index // dilation, index % dilation
    group_len = (length - residue + dilation - 1) // dilation
    slot = torch.arange(kernel_size, device=device)
    if is_causal:
        start = (group - kernel_size + 1).clamp(min=0)
    else:
        start = torch.minimum((group - kernel_size // 2).clamp(min=0), group_len - kernel_size)
    key_group = start[:, None] + slot[None, :]
    valid = key_group <= group[:, None] if is_causal else torch.ones_like(key_group, dtype=torch.bool)
    key = torch.where(valid, key_group * dilation + residue[:, None], index[:, None])
    rel = (key_group - group[:, None] + kernel_size - 1).clamp(0, 2 * kernel_size - 2)
    return key, valid, rel


def neighborhood_tables(
    spatial: tuple[int, ...],
    kernel_size: tuple[int, ...],
    dilation: tuple[int, ...],
    is_causal: tuple[bool, ...],
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flattened neighbourhoods of an N-D grid.

    Returns ``(key, valid, rel)``, each ``[prod(spatial), prod(kernel_size)]``: the flattened
    (row-major) key token of each window slot, its validity, and the flattened index into an
    rpb table of shape ``[2k_1 - 1, ..., 2k_n - 1]``.
    """
    n = len(spatial)
    key = torch.zeros((), dtype=torch.long, device=device)
    rel = torch.zeros((), dtype=torch.long, device=device)
    valid = torch.ones((), dtype=torch.bool, device=device)
    for dim, (length, ks, dil, causal) in enumerate(zip(spatial, kernel_size, dilation, is_causal)):
        k_d, v_d, r_d = window_indices(length, ks, dil, causal, device)
        # Place this dim's query axis at position `dim` and its slot axis at `n + dim`.
        shape = [1] * (2 * n)
        shape[dim], shape[n + dim] = length, ks
        key = key * length + k_d.view(shape)
        rel = rel * (2 * ks - 1) + r_d.view(shape)
        valid = valid & v_d.view(shape)
    tokens, window = math.prod(spatial), math.prod(kernel_size)
    return key.reshape(tokens, window), valid.reshape(tokens, window), rel.reshape(tokens, window)


def neighborhood_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: tuple[int, ...],
    dilation: tuple[int, ...],
    is_causal: tuple[bool, ...],
    rpb: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Neighborhood attention on validated arguments.

    ``q, k, v``: ``[batch, *spatial, heads, head_dim]``; per-dim tuples of length
    ``len(spatial)``; ``rpb``: ``[heads, 2k_1 - 1, ...]`` or ``None``. Returns a tensor
    shaped like ``q``. Half-precision inputs are computed in float32. Differentiable.
    """
    batch, *spatial, heads, head_dim = q.shape
    spatial = tuple(spatial)
    compute = torch.promote_types(q.dtype, torch.float32)
    tokens = math.prod(spatial)
    # Heads-first [batch, heads, tokens, head_dim], so gathered windows feed batched matmuls.
    qf, kf, vf = (t.reshape(batch, tokens, heads, head_dim).transpose(1, 2).to(compute) for t in (q, k, v))
    key, valid, rel = neighborhood_tables(spatial, kernel_size, dilation, is_causal, q.device)
    window = key.shape[1]
    bias_table = None if rpb is None else rpb.reshape(heads, -1).to(compute)

    def attend(q_chunk, key_c, valid_c, rel_c, kf, vf, bias_table):
        keys = kf[:, :, key_c]  # [batch, heads, chunk, window, head_dim]
        logits = (q_chunk.unsqueeze(-2) @ keys.transpose(-1, -2)) * scale  # [batch, heads, chunk, 1, window]
        if bias_table is not None:
            logits = logits + bias_table[:, rel_c].unsqueeze(-2)  # [heads, chunk, 1, window]
        logits = logits.clamp(-LOGIT_LIMIT, LOGIT_LIMIT)  # a huge scale saturates instead of giving NaN
        weights = logits.masked_fill(~valid_c[:, None, :], float("-inf")).softmax(dim=-1)
        return (weights @ vf[:, :, key_c]).squeeze(-2)  # [batch, heads, chunk, head_dim]

    # Under autograd each chunk is recomputed in backward instead of keeping its gathered keys.
    tensors = (qf, kf, vf) + (() if bias_table is None else (bias_table,))
    recompute = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, batch * window * heads * head_dim))
    outs = []
    for begin in range(0, tokens, chunk):
        sl = slice(begin, min(begin + chunk, tokens))
        args = (qf[:, :, sl], key[sl], valid[sl], rel[sl], kf, vf, bias_table)
        outs.append(checkpoint(attend, *args, use_reentrant=False) if recompute else attend(*args))
    out = torch.cat(outs, dim=2).transpose(1, 2)
    return out.reshape(q.shape).to(q.dtype)
