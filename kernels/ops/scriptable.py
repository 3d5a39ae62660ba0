"""The attention ops as ``torch.ops.visattn.*`` for TorchScript.

``torch.jit.script`` cannot compile the public Python functions (argument checks, backend choice), so
each is also registered as one dispatcher op that TorchScript code can call:

- ``torch.ops.visattn.neighborhood_attention(q, k, v, kernel_size, dilation, is_causal, rpb, scale, backend)``
- ``torch.ops.visattn.bilevel_routing_attention(q, k, v, num_regions, topk, scale, backend)``
- ``torch.ops.visattn.agent_attention(q, k, v, agent, scale, agent_bias, query_bias, backend)``
- ``torch.ops.visattn.large_kernel_attention(x, dw_weight, dw_bias, dwd_weight, dwd_bias, pw_weight,
  pw_bias, dilation, backend)``

Arguments are those of the Python functions (sequences as lists); results are contiguous. The op runs
the Python function, so it checks its arguments and picks its backend the same way.
Gradients: the backward runs the function again under autograd and differentiates it (the forward
keeps no graph), so a scripted model trains with the same gradients at the cost of one more forward
per op. Eager code calls the Python functions directly.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from visattn.kernels.ops.agent_attention import agent_attention
from visattn.kernels.ops.bilevel_routing_attention import bilevel_routing_attention
from visattn.kernels.ops.large_kernel_attention import large_kernel_attention
from visattn.kernels.ops.neighborhood_attention import neighborhood_attention

__all__: list[str] = []


def _register(name: str, fn: Callable, fake: Callable) -> None:
    """Register ``fn`` (tensor result) as ``visattn::name`` with a fake impl and recompute-based autograd."""
    op = torch.library.custom_op(f"visattn::{name}", fn, mutates_args=())
    op.register_fake(fake)

    def setup_context(ctx, inputs, output):
        ctx.tensor_slots = [i for i, a in enumerate(inputs) if isinstance(a, Tensor)]
        ctx.others = [None if isinstance(a, Tensor) else a for a in inputs]
        ctx.save_for_backward(*[inputs[i] for i in ctx.tensor_slots])

    def backward(ctx, grad):
        args = list(ctx.others)
        wanted = []
        for i, t in zip(ctx.tensor_slots, ctx.saved_tensors):
            args[i] = t.detach().requires_grad_(ctx.needs_input_grad[i])
            if ctx.needs_input_grad[i]:
                wanted.append(i)
        with torch.enable_grad():
            out = fn(*args)
            grads = torch.autograd.grad(out, [args[i] for i in wanted], grad, allow_unused=True)
        result: list[Tensor | None] = [None] * len(args)
        for i, g in zip(wanted, grads):
            result[i] = g
        return tuple(result)

    op.register_autograd(backward, setup_context=setup_context)


def _neighborhood_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kernel_size: list[int],
    dilation: list[int],
    is_causal: list[bool],
    rpb: Tensor | None,
    scale: float | None,
    backend: str,
) -> Tensor:
    return neighborhood_attention(q, k, v, kernel_size, dilation, is_causal, rpb, scale, backend).contiguous()


def _bilevel_routing_attention(
    q: Tensor, k: Tensor, v: Tensor, num_regions: int, topk: int, scale: float | None, backend: str
) -> Tensor:
    return bilevel_routing_attention(q, k, v, num_regions, topk, scale, backend=backend).contiguous()


def _agent_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    agent: Tensor,
    scale: float | None,
    agent_bias: Tensor | None,
    query_bias: Tensor | None,
    backend: str,
) -> Tensor:
    return agent_attention(q, k, v, agent, scale, agent_bias, query_bias, backend).contiguous()


def _large_kernel_attention(
    x: Tensor,
    dw_weight: Tensor,
    dw_bias: Tensor | None,
    dwd_weight: Tensor,
    dwd_bias: Tensor | None,
    pw_weight: Tensor,
    pw_bias: Tensor | None,
    dilation: int,
    backend: str,
) -> Tensor:
    return large_kernel_attention(
        x, dw_weight, dw_bias, dwd_weight, dwd_bias, pw_weight, pw_bias, dilation, backend
    ).contiguous()


def _like_v(q: Tensor, k: Tensor, v: Tensor, *_) -> Tensor:
    """Fake result of the q/k/v ops: ``q``'s leading dims with ``v``'s head width."""
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


_register("neighborhood_attention", _neighborhood_attention, _like_v)
_register("bilevel_routing_attention", _bilevel_routing_attention, _like_v)
_register("agent_attention", _agent_attention, _like_v)
_register("large_kernel_attention", _large_kernel_attention, lambda x, *_: torch.empty_like(x))
