"""AgentSD's attention maths on merged tokens and their agents (agentsd/patch.py ``AgentAttention``), on
:func:`visattn.kernels.agent_attention`."""

from __future__ import annotations

import torch

from visattn.kernels import agent_attention

__all__ = ["agentsd_attention"]


def agentsd_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agent: torch.Tensor,
    scale: float,
    k_scale2: float = 0.3,
    k_shortcut: float = 0.075,
    upcast: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """AgentSD's attention: ``softmax(q A^T s^k_scale2) softmax(A k^T s) v + k_shortcut v``.

    Shapes: q/k ``[B, N, H, D]``, v ``[B, N, H, Dv]``, agent ``[B, A, H, D]``; returns ``[B, N, H, Dv]``
    in the dtype of ``q``. ``upcast`` computes in float32 (AgentSD's ``attn_precision="fp32"``).
    The second temperature enters through the queries: ``(q s^(k_scale2 - 1)) A^T s = q A^T s^k_scale2``.
    """
    dtype = q.dtype
    if upcast:
        q, k, v, agent = (t.float() for t in (q, k, v, agent))
    out = agent_attention(q * scale ** (k_scale2 - 1.0), k, v, agent, scale=scale, backend=backend)
    return (out + k_shortcut * v).to(dtype)
