"""Compile an op's Triton kernels for an H100 (sm_90) on a machine without a GPU.

``python -m tests.sm90_compile OP`` (without ``TRITON_INTERPRET``) compiles through the stand-in
driver of :mod:`visattn.bench._sm90`, running the public op with ``backend="triton"`` on CPU tensors
of realistic shapes, forward and backward, in bf16 and fp32 (the tensors stay unwritten: only
compilation is checked). Prints one
line per compiled kernel, ``compiled <kernel name>``, after a ``dtype <name>`` line per input dtype.
"""

from __future__ import annotations

import sys

import torch

from visattn.bench._sm90 import compile_only


def _leaf(*shape, dtype):
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


def neighborhood_attention(dtype):
    from visattn.kernels import neighborhood_attention as na

    q, k, v = (_leaf(1, 14, 14, 4, 32, dtype=dtype) for _ in range(3))  # NAT-T stage 3
    rpb = _leaf(4, 13, 13, dtype=torch.float32)
    na(q, k, v, 7, dilation=2, rpb=rpb, backend="triton").sum().backward()
    q, k, v = (_leaf(1, 64, 2, 64, dtype=dtype) for _ in range(3))
    na(q, k, v, 9, is_causal=True, backend="triton").sum().backward()
    q, k, v = (_leaf(1, 6, 8, 8, 2, 32, dtype=dtype) for _ in range(3))
    na(q, k, v, (3, 5, 5), backend="triton").sum().backward()


def bilevel_routing_attention(dtype):
    from visattn.kernels import bilevel_routing_attention as bra

    q, k, v = (_leaf(1, 56, 56, 2, 32, dtype=dtype) for _ in range(3))  # BiFormer-S stage 1
    bra(q, k, v, num_regions=7, topk=1, backend="triton").sum().backward()
    q, k, v = (_leaf(1, 14, 14, 8, 32, dtype=dtype) for _ in range(3))  # stage 3
    bra(q, k, v, num_regions=7, topk=16, backend="triton").sum().backward()


def agent_attention(dtype):
    from visattn.kernels import agent_attention as aa

    q, k, v = (_leaf(1, 3136, 2, 32, dtype=dtype) for _ in range(3))  # Agent-Swin-T stage 1
    agent = _leaf(1, 49, 2, 32, dtype=dtype)
    agent_bias = _leaf(1, 2, 49, 3136, dtype=dtype)
    query_bias = _leaf(1, 2, 3136, 49, dtype=dtype)
    aa(q, k, v, agent, agent_bias=agent_bias, query_bias=query_bias, backend="triton").sum().backward()


def attention_with_key_mass(dtype):
    from visattn.kernels import attention_with_key_mass as akm

    q = torch.randn(1, 640, 32, 128, dtype=dtype)  # LLaMA-7B heads, 576 visual + 64 text tokens
    k, v = (torch.randn(1, 640, 8, 128, dtype=dtype) for _ in range(2))
    mask = torch.zeros(1, 1, 640, 640, dtype=dtype)
    for query_set in ("all", "last"):
        akm(q, k, v, attn_mask=mask, query_set=query_set, backend="triton")
    akm(q, k, v, causal=True, backend="triton")


def visual_sink_attention(dtype):
    from visattn.kernels import visual_sink_attention as vsa

    q = torch.randn(1, 640, 32, 128, dtype=dtype)
    k, v = (torch.randn(1, 640, 8, 128, dtype=dtype) for _ in range(2))
    category = torch.randint(0, 4, (1, 640))
    vsa(q, k, v, category, torch.ones(1, 640, dtype=torch.bool), causal=True, backend="triton")


OPS = {
    f.__name__: f
    for f in (
        neighborhood_attention,
        bilevel_routing_attention,
        agent_attention,
        attention_with_key_mass,
        visual_sink_attention,
    )
}


def main(op: str) -> None:
    import importlib

    record = []
    compile_only(record)
    # outside the interpreter the ops refuse Triton on CPU tensors; here those only carry shapes/dtypes
    module = importlib.import_module(f"visattn.kernels.ops.{op}")
    module.resolve_backend = lambda backend, *tensors, op, limit=None: "triton"
    for dtype in (torch.bfloat16, torch.float32):
        print("dtype", str(dtype).removeprefix("torch."), flush=True)
        OPS[op](dtype)
        for compiled in record:
            print("compiled", compiled.kernel, flush=True)
        record.clear()


if __name__ == "__main__":
    main(sys.argv[1])
