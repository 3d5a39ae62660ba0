"""Agent attention: our Triton op vs the official-style PyTorch computation.

Times the forward and forward+backward (median ms) and the peak memory above the inputs (CUDA
allocator, or the profiler on CPU) of ``visattn.kernels.agent_attention`` (Triton backend; on CPU only
under TRITON_INTERPRET=1, where timings mean nothing), our PyTorch reference backend, and the
computation as the official Agent-Attention models write it (heads-first permutes, biases
``.repeat``-ed over the batch, two matmul + softmax steps with both probability matrices
materialised). Shapes are the agent-attention stages of Agent-Swin-T (window 56 = whole stage,
head_dim 32) and Agent-PVT-T (head_dim 64) at 224, with the position biases the models add; --device
cpu uses a small batch. The last columns give the speed-up of our op (Triton, else the reference) over
each row, measured in the same run."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch

from visattn.bench._timing import Measurement, error_note, measure, print_table, ratio, time_mem_cells
from visattn.kernels import agent_attention
from visattn.kernels.ops.dispatch import interpreter_enabled, triton_available

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Case:
    name: str
    tokens: int
    heads: int
    head_dim: int
    agents: int


CASES = [
    Case("swin-t s1 56x56", 3136, 3, 32, 9),
    Case("swin-t s2 28x28", 784, 6, 32, 16),
    Case("swin-t s3 14x14", 196, 12, 32, 49),
    Case("pvt-t s1 56x56", 3136, 1, 64, 9),
    Case("pvt-t s2 28x28", 784, 2, 64, 16),
    Case("pvt-t s3 14x14", 196, 5, 64, 49),
    Case("pvt-t s4 7x7", 49, 8, 64, 49),
]


def official_style(q, k, v, agent, agent_bias, query_bias):
    """The official models' sequence of ops on ``[B, N, H, D]`` inputs (biases repeated over the batch)."""
    b = q.shape[0]
    scale = q.shape[-1] ** -0.5
    q, k, v, agent = (t.permute(0, 2, 1, 3) for t in (q, k, v, agent))
    agent_attn = torch.softmax((agent * scale) @ k.transpose(-2, -1) + agent_bias.repeat(b, 1, 1, 1), dim=-1)
    agent_v = agent_attn @ v
    q_attn = torch.softmax((q * scale) @ agent.transpose(-2, -1) + query_bias.repeat(b, 1, 1, 1), dim=-1)
    return (q_attn @ agent_v).transpose(1, 2)


def _ours(backend: str) -> Callable:
    return lambda q, k, v, agent, ab, qb: agent_attention(
        q, k, v, agent, agent_bias=ab, query_bias=qb, backend=backend
    )


def _time(fn: Callable, inputs: list[torch.Tensor], device: str, backward: bool, warmup: int, iters: int):
    if not backward:
        detached = [t.detach() for t in inputs]

        def step():
            with torch.no_grad():
                return fn(*detached)
    else:
        grad = torch.randn_like(fn(*inputs).detach())

        def step():
            return torch.autograd.grad(fn(*inputs), inputs, grad)

    return measure(step, device, warmup=warmup, iters=iters)


def _measure(fn, inputs, device, warmup, iters) -> tuple[Measurement | None, Measurement | None, str]:
    if fn is None:
        return None, None, "skipped (needs CUDA or TRITON_INTERPRET=1)"
    try:
        fwd = _time(fn, inputs, device, False, warmup, iters)
        bwd = _time(fn, inputs, device, True, warmup, iters)
    except Exception as exc:  # a provider that cannot run a case is reported, not fatal
        return None, None, error_note(exc)
    finally:
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return fwd, bwd, ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--batch", type=int, help="batch size (default 64 on CUDA, 2 on CPU)")
    parser.add_argument("--case", default="", help="only run cases whose name contains this text")
    parser.add_argument("--iters", type=int, help="timed iterations (default 20 on CUDA, 3 on CPU)")


def run(args: argparse.Namespace) -> int:
    device = args.device
    cuda = device.startswith("cuda")
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    batch = args.batch or (64 if cuda else 2)
    iters = args.iters or (20 if cuda else 3)
    warmup = 3 if cuda else 1
    run_triton = triton_available() and (cuda or interpreter_enabled())
    rows = []
    for case in CASES:
        if args.case not in case.name:
            continue
        gen = torch.Generator().manual_seed(0)

        def rand(*shape, std=1.0, gen=gen):
            return (std * torch.randn(*shape, generator=gen)).to(device=device, dtype=dtype).requires_grad_()

        n, h, d, a = case.tokens, case.heads, case.head_dim, case.agents
        inputs = [
            rand(batch, n, h, d),
            rand(batch, n, h, d),
            rand(batch, n, h, d),
            rand(batch, a, h, d),
            rand(1, h, a, n, std=0.02),
            rand(1, h, n, a, std=0.02),
        ]
        providers = [
            ("visattn triton", _ours("triton") if run_triton else None),
            ("visattn torch", _ours("torch")),
            ("official-style", official_style),
        ]
        results = [(name, *_measure(fn, inputs, device, warmup, iters)) for name, fn in providers]
        mine = next((r for r in results if r[0].startswith("visattn") and r[1] is not None), None)
        for name, fwd, bwd, note in results:
            rows.append(
                [
                    case.name,
                    name,
                    *time_mem_cells(fwd),
                    *time_mem_cells(bwd),
                    ratio(fwd, mine[1]) if mine else "-",
                    ratio(bwd, mine[2]) if mine else "-",
                    note,
                ]
            )
    title = (
        f"agent attention on {device} ({torch.cuda.get_device_name(device) if cuda else 'cpu'}), "
        f"{str(dtype).removeprefix('torch.')}, batch {batch}, with position biases; "
        "speed-up = row time / ours"
    )
    headers = [
        "case",
        "impl",
        "fwd ms",
        "fwd MiB",
        "fwd+bwd ms",
        "fwd+bwd MiB",
        "ours fwd x",
        "ours f+b x",
        "note",
    ]
    print_table(headers, rows, title=title)
    return 0
