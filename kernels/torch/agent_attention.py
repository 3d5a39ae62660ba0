"""Agent attention's ``torch`` backend: both softmax steps through ``scaled_dot_product_attention``.

On CUDA, torch's flash / memory-efficient kernels take the biases as additive masks, so the ``[A, Nk]``
and ``[Nq, A]`` probabilities are never stored. On CPU the ``torch`` backend runs the reference instead:
SDPA is mostly faster there, but its results depend on how the batch is split (docs/kernels.md), which
broke the check that a data-parallel step equals the one-process step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from visattn.kernels.ops import dispatch
from visattn.kernels.reference.agent_attention import agent_attention_reference


def agent_attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agent: torch.Tensor,
    scale: float,
    agent_bias: torch.Tensor | None = None,
    query_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Both steps as SDPA calls: ``q [B, Nq, H, D]``, ``k [B, Nk, H, D]``, ``v [B, Nk, H, Dv]``, ``agent
    [B, A, H, D]``, biases ``[B or 1, H, A, Nk]`` / ``[B or 1, H, Nq, A]``; returns ``[B, Nq, H, Dv]``."""
    qh, kh, vh, ah = (t.transpose(1, 2) for t in (q, k, v, agent))
    agent_v = F.scaled_dot_product_attention(ah, kh, vh, attn_mask=agent_bias, scale=scale)
    out = F.scaled_dot_product_attention(qh, ah, agent_v, attn_mask=query_bias, scale=scale)
    return out.transpose(1, 2)


def agent_attention_torch(q, k, v, agent, scale, agent_bias=None, query_bias=None) -> torch.Tensor:
    """The ``torch`` backend (shapes as :func:`agent_attention_sdpa`): SDPA on CUDA, else the reference."""
    if dispatch.cuda_tensors(q, k, v, agent):
        return agent_attention_sdpa(q, k, v, agent, scale, agent_bias, query_bias)
    return agent_attention_reference(q, k, v, agent, scale, agent_bias, query_bias)
