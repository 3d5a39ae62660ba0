"""Agent attention (Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention",
ECCV 2024; official code LeapLabTHU/Agent-Attention).

A small set of agent tokens first aggregates the keys/values, then every query reads from the agents::

    agent_v = softmax(agent @ k^T * scale + agent_bias) @ v          # [B, H, A, Dv]
    out     = softmax(q @ agent^T * scale + query_bias) @ agent_v    # [B, Nq, H, Dv]

The official models use one ``scale = head_dim ** -0.5`` for both softmaxes (``self.scale`` in every
``AgentAttention`` of agent_{swin,pvt,deit}.py); it is the default here. Cost is linear in the token
count: ``O((Nq + Nk) * A * D)``.
"""

from __future__ import annotations

import math

import torch

from visattn.kernels._checks import check_float_tensors, check_ndim
from visattn.kernels._dispatch import resolve_backend
from visattn.kernels.reference.agent_attention import agent_attention_reference

OP = "agent_attention"
TRITON_MAX_AGENTS = 256
TRITON_MAX_HEAD_DIM = 256


def _check_bias(
    name: str, bias: torch.Tensor, batch: int, expected: tuple[int, int, int], layout: str
) -> None:
    check_ndim(OP, name, bias, (4,), layout)
    if bias.shape[0] not in (1, batch) or tuple(bias.shape[1:]) != expected:
        raise ValueError(
            f"{OP}: {name} must have shape {layout} = ({batch} or 1, {', '.join(map(str, expected))}), "
            f"got {tuple(bias.shape)}"
        )


def _validate(q, k, v, agent, scale, agent_bias, query_bias) -> float:
    tensors = {"q": q, "k": k, "v": v, "agent": agent}
    if agent_bias is not None:
        tensors["agent_bias"] = agent_bias
    if query_bias is not None:
        tensors["query_bias"] = query_bias
    check_float_tensors(OP, **tensors)
    for name, layout in (
        ("q", "[batch, tokens, heads, head_dim]"),
        ("k", "[batch, kv_tokens, heads, head_dim]"),
        ("v", "[batch, kv_tokens, heads, v_head_dim]"),
        ("agent", "[batch, agents, heads, head_dim]"),
    ):
        check_ndim(OP, name, tensors[name], (4,), layout)
    batch, nq, heads, dim = q.shape
    nk, num_agents = k.shape[1], agent.shape[1]
    if k.shape[0] != batch or k.shape[2] != heads or k.shape[3] != dim:
        raise ValueError(
            f"{OP}: k must be [batch={batch}, kv_tokens, heads={heads}, head_dim={dim}] like q, "
            f"got {tuple(k.shape)}"
        )
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"{OP}: v must be [batch, kv_tokens, heads, v_head_dim] with the first three dims of k "
            f"{tuple(k.shape[:3])}, got {tuple(v.shape)}"
        )
    if agent.shape[0] != batch or agent.shape[2] != heads or agent.shape[3] != dim:
        raise ValueError(
            f"{OP}: agent must be [batch={batch}, agents, heads={heads}, head_dim={dim}], "
            f"got {tuple(agent.shape)}"
        )
    if min(nq, nk, num_agents, dim, v.shape[3]) == 0:
        raise ValueError(
            f"{OP}: empty input: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
            f"agent {tuple(agent.shape)}"
        )
    if agent_bias is not None:
        _check_bias(
            "agent_bias", agent_bias, batch, (heads, num_agents, nk), "[batch or 1, heads, agents, kv_tokens]"
        )
    if query_bias is not None:
        _check_bias(
            "query_bias", query_bias, batch, (heads, nq, num_agents), "[batch or 1, heads, tokens, agents]"
        )
    if scale is None:
        return dim**-0.5
    if (
        isinstance(scale, bool)
        or not isinstance(scale, (int, float))
        or not math.isfinite(scale)
        or scale <= 0
    ):
        raise ValueError(
            f"{OP}: scale must be a positive finite number or None (head_dim ** -0.5), got {scale!r}"
        )
    return float(scale)


def agent_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agent: torch.Tensor,
    scale: float | None = None,
    agent_bias: torch.Tensor | None = None,
    query_bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Agent attention: agents attend to the keys/values, then the queries attend to the agents.

    Args:
        q: queries ``[B, Nq, H, D]``.
        k: keys ``[B, Nk, H, D]`` (``Nk`` may differ from ``Nq``, e.g. PVT spatial reduction).
        v: values ``[B, Nk, H, Dv]``.
        agent: agent tokens ``[B, A, H, D]`` (the official models average-pool the queries).
        scale: score scale used by both softmaxes; default ``D ** -0.5``.
        agent_bias: added to the agent->key scores, shape ``[B or 1, H, A, Nk]``.
        query_bias: added to the query->agent scores, shape ``[B or 1, H, Nq, A]``.
        backend: ``"auto"`` (Triton on CUDA, PyTorch elsewhere), ``"triton"`` or ``"torch"``.

    Returns:
        ``[B, Nq, H, Dv]`` in the dtype of ``q``.
    """
    scale = _validate(q, k, v, agent, scale, agent_bias, query_bias)
    tensors = [t for t in (q, k, v, agent, agent_bias, query_bias) if t is not None]
    chosen = resolve_backend(backend, *tensors, op=OP)
    if chosen == "triton" and backend == "auto" and q.dtype == torch.float64:
        chosen = "torch"
    if chosen == "torch":
        return agent_attention_reference(q, k, v, agent, scale, agent_bias, query_bias)
    raise ValueError(f"{OP}: the Triton backend is not available yet; use backend='torch'")
