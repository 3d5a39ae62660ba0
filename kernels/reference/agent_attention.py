"""PyTorch reference of agent attention (Han et al., "Agent Attention", ECCV 2024).

Written the way the official models compute it (scale applied to the left operand before the
matmul, bias added, softmax, matmul), so that models built on it reproduce the official outputs.
"""

from __future__ import annotations

import torch


def agent_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agent: torch.Tensor,
    scale: float,
    agent_bias: torch.Tensor | None = None,
    query_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Two-step softmax attention through a small set of agent tokens.

    Shapes: q ``[B, Nq, H, D]``, k ``[B, Nk, H, D]``, v ``[B, Nk, H, Dv]``, agent ``[B, A, H, D]``,
    agent_bias ``[B or 1, H, A, Nk]``, query_bias ``[B or 1, H, Nq, A]``. Returns ``[B, Nq, H, Dv]``::

        agent_v = softmax(agent @ k^T * scale + agent_bias) @ v      # [B, H, A, Dv]
        out     = softmax(q @ agent^T * scale + query_bias) @ agent_v
    """
    qh, kh, vh, ah = (t.transpose(1, 2) for t in (q, k, v, agent))  # [B, H, tokens, dim]
    agent_scores = (ah * scale) @ kh.transpose(-2, -1)
    if agent_bias is not None:
        agent_scores = agent_scores + agent_bias
    agent_v = agent_scores.softmax(dim=-1) @ vh
    query_scores = (qh * scale) @ ah.transpose(-2, -1)
    if query_bias is not None:
        query_scores = query_scores + query_bias
    out = query_scores.softmax(dim=-1) @ agent_v
    return out.transpose(1, 2)
