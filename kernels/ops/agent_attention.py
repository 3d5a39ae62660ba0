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

import torch

from visattn.kernels.ops.checks import check_float_tensors, check_ndim, softmax_scale
from visattn.kernels.ops.dispatch import TRITON_DTYPES, interpreter_enabled, resolve_backend, triton_limit
from visattn.kernels.reference.agent_attention import agent_attention_reference
from visattn.kernels.torch.agent_attention import agent_attention_torch

OP = "agent_attention"
MAX_TRITON_AGENTS = 256
MAX_TRITON_HEAD_DIM = 256


def _check_bias(
    name: str, bias: torch.Tensor, batch: int, expected: tuple[int, int, int], layout: str
) -> None:
    check_ndim(OP, name, bias, (4,), layout)
    if bias.shape[0] not in (1, batch) or tuple(bias.shape[1:]) != expected:
        raise ValueError(
            f"{OP}: {name} must have shape {layout} = ({batch} or 1, {', '.join(map(str, expected))}), "
            f"got {tuple(bias.shape)}"
        )


def _check_args(q, k, v, agent, scale, agent_bias, query_bias) -> float:
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
    return softmax_scale(OP, scale, dim)


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
        backend: ``"auto"`` (on CUDA: Triton for float16/bfloat16/float32 with at most 256 agents and
            head dims up to 256, else ``"torch"``; ``"torch"`` elsewhere), ``"triton"``, ``"torch"`` (on
            CUDA both steps through ``scaled_dot_product_attention``, on CPU the reference) or
            ``"reference"``.

    Returns:
        ``[B, Nq, H, Dv]`` in the dtype of ``q``.
    """
    scale = _check_args(q, k, v, agent, scale, agent_bias, query_bias)
    tensors = [t for t in (q, k, v, agent, agent_bias, query_bias) if t is not None]
    chosen = resolve_backend(backend, *tensors, op=OP, limit=_triton_limit(q, v, agent))
    if chosen == "torch":
        return agent_attention_torch(q, k, v, agent, scale, agent_bias, query_bias)
    if chosen == "reference":
        return agent_attention_reference(q, k, v, agent, scale, agent_bias, query_bias)
    return _triton_fwd(q, k, v, agent, agent_bias, query_bias, scale)[0]


def _triton_limit(q: torch.Tensor, v: torch.Tensor, agent: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take these inputs, or None."""
    if agent.shape[1] > MAX_TRITON_AGENTS and q.dtype in TRITON_DTYPES:
        return (
            f"holds all agents in one block: at most {MAX_TRITON_AGENTS} agents, got {agent.shape[1]} "
            "(backend='auto' uses scaled_dot_product_attention then)"
        )
    return triton_limit(q.dtype, (q.shape[3], v.shape[3]), MAX_TRITON_HEAD_DIM)


# Triton path as torch.library ops (fake + autograd) so it traces under torch.compile / export.
# Outputs: out [B, Nq, H, Dv], agent_v [B, H, A, Dv] (fp32), base-2 log-sum-exps [B, H, A] and [B, H, Nq].
@torch.library.custom_op("visattn::agent_attention_fwd", mutates_args=())
def _triton_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agent: torch.Tensor,
    agent_bias: torch.Tensor | None,
    query_bias: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from visattn.kernels.triton.agent_attention import agent_attention_forward

    return agent_attention_forward(q, k, v, agent, agent_bias, query_bias, scale, interpreter_enabled())


@_triton_fwd.register_fake
def _(q, k, v, agent, agent_bias, query_bias, scale):
    batch, nq, heads, _ = q.shape
    num_agents, dv = agent.shape[1], v.shape[3]
    return (
        q.new_empty(batch, nq, heads, dv),
        q.new_empty(batch, heads, num_agents, dv, dtype=torch.float32),
        q.new_empty(batch, heads, num_agents, dtype=torch.float32),
        q.new_empty(batch, heads, nq, dtype=torch.float32),
    )


@torch.library.custom_op("visattn::agent_attention_bwd", mutates_args=())
def _triton_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agent: torch.Tensor,
    agent_bias: torch.Tensor | None,
    query_bias: torch.Tensor | None,
    out: torch.Tensor,
    agent_v: torch.Tensor,
    lse_agent: torch.Tensor,
    lse_query: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k, v, agent, agent_bias, query_bias (an empty tensor for an absent bias)."""
    from visattn.kernels.triton.agent_attention import agent_attention_backward

    grads = agent_attention_backward(
        dout,
        q,
        k,
        v,
        agent,
        agent_bias,
        query_bias,
        out,
        agent_v,
        lse_agent,
        lse_query,
        scale,
        interpreter_enabled(),
    )
    return tuple(g if g is not None else q.new_empty(0) for g in grads)


@_triton_bwd.register_fake
def _(dout, q, k, v, agent, agent_bias, query_bias, out, agent_v, lse_agent, lse_query, scale):
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
        torch.empty_like(agent, memory_format=torch.contiguous_format),
        torch.empty_like(agent_bias) if agent_bias is not None else q.new_empty(0),
        torch.empty_like(query_bias) if query_bias is not None else q.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, agent, agent_bias, query_bias, scale = inputs
    out, agent_v, lse_agent, lse_query = output
    ctx.save_for_backward(q, k, v, agent, agent_bias, query_bias, out, agent_v, lse_agent, lse_query)
    ctx.scale = scale


def _backward(ctx, dout, _d_agent_v, _d_lse_agent, _d_lse_query):
    q, k, v, agent, agent_bias, query_bias, out, agent_v, lse_agent, lse_query = ctx.saved_tensors
    dq, dk, dv, d_agent, d_agent_bias, d_query_bias = _triton_bwd(
        dout, q, k, v, agent, agent_bias, query_bias, out, agent_v, lse_agent, lse_query, ctx.scale
    )
    return (
        dq,
        dk,
        dv,
        d_agent,
        d_agent_bias if agent_bias is not None else None,
        d_query_bias if query_bias is not None else None,
        None,
    )


_triton_fwd.register_autograd(_backward, setup_context=_setup_context)
