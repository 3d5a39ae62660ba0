"""Compile an op's Triton kernels for an H100 (sm_90) on a machine without a GPU.

``python -m tests.sm90_compile OP`` (without ``TRITON_INTERPRET``) replaces Triton's driver by a
stand-in whose target is sm_90 and turns every kernel launch into a compile-only warmup, then runs the
public op with ``backend="triton"`` on CPU tensors of realistic shapes, forward and backward. Every
kernel is therefore lowered to a cubin with the arguments and constexprs its launcher really picks
(the tensors stay unwritten: the numbers are meaningless, only compilation is checked). Prints one
line per compiled kernel, ``compiled <kernel name>``, after a ``dtype <name>`` line per input dtype.
"""

from __future__ import annotations

import sys

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction


class _StandInGPU:
    """The part of a Triton driver that compilation asks for: an sm_90 target, device 0."""

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


def _compile_only() -> None:
    driver.set_active(_StandInGPU())
    run = JITFunction.run

    def warmup(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        assert "cubin" in kernel.asm, f"{self.fn.__name__}: no cubin"
        print("compiled", self.fn.__name__, flush=True)
        return kernel

    JITFunction.run = warmup


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

    _compile_only()
    # outside the interpreter the ops refuse Triton on CPU tensors; here those only carry shapes/dtypes
    module = importlib.import_module(f"visattn.kernels.{op}")
    module.resolve_backend = lambda backend, *tensors, op, limit=None: "triton"
    for dtype in (torch.bfloat16, torch.float32):
        print("dtype", str(dtype).removeprefix("torch."), flush=True)
        OPS[op](dtype)


if __name__ == "__main__":
    main(sys.argv[1])
