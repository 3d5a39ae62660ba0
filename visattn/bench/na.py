"""Neighborhood attention: our Triton op vs reference, FlexAttention, NATTEN and dense SDPA.

Times the forward and forward+backward (median ms) and the peak memory above the inputs (CUDA
allocator, or the profiler on CPU) of: ``visattn.kernels.neighborhood_attention`` on the Triton and
the PyTorch backends, ``torch.nn.attention.flex_attention`` with a neighborhood block mask (compiled
on CUDA; eager on CPU unless --flex-compile), NATTEN's ``na{1,2,3}d`` when installed,
``scaled_dot_product_attention`` with the neighbourhood as a dense ``N x N`` additive mask (exact NA;
the floor of any path through SDPA on maps about the window's size), and dense SDPA over the same
tokens (a different, all-to-all computation, shown as the cost NA avoids). Shapes follow NAT-Tiny
(56/28/14/7 grids, kernel 7, heads 2/4/8/16, head_dim 32), a DiNAT dilated stage, one 1-D and one 3-D
case; --device cpu uses small sizes. The last columns give the speed-up of our op (Triton, else the
PyTorch backend) over each row, measured in the same run. Failures are reported as "n/a"."""

from __future__ import annotations

import argparse
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from visattn.bench._timing import measure_side_by_side, print_table, ratio, time_mem_cells
from visattn.kernels import neighborhood_attention
from visattn.kernels.ops.dispatch import interpreter_enabled, triton_available
from visattn.kernels.reference.neighborhood_attention import neighborhood_tables, window_indices

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    spatial: tuple[int, ...]
    heads: int
    head_dim: int
    kernel_size: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...] = ()

    @property
    def causal(self) -> tuple[bool, ...]:
        return self.is_causal or (False,) * len(self.spatial)


def _cases(device: str, batch: int | None) -> list[Case]:
    if device == "cpu":
        b = batch or 2
        return [
            Case("nat 56x56 h2", b, (56, 56), 2, 32, (7, 7), (1, 1)),
            Case("nat 14x14 h2", b, (14, 14), 2, 32, (7, 7), (1, 1)),
            Case("nat 7x7 h4", b, (7, 7), 4, 32, (7, 7), (1, 1)),
            Case("dinat 14x14 d2", b, (14, 14), 2, 32, (7, 7), (2, 2)),
            Case("1-D 512 k31 causal", 1, (512,), 2, 32, (31,), (1,), (True,)),
            Case("3-D 6x8x8 k3", 1, (6, 8, 8), 2, 32, (3, 3, 3), (1, 1, 1)),
        ]
    b = batch or 32
    return [
        Case("nat 56x56 h2", b, (56, 56), 2, 32, (7, 7), (1, 1)),
        Case("nat 28x28 h4", b, (28, 28), 4, 32, (7, 7), (1, 1)),
        Case("nat 14x14 h8", b, (14, 14), 8, 32, (7, 7), (1, 1)),
        Case("nat 7x7 h16", b, (7, 7), 16, 32, (7, 7), (1, 1)),
        Case("dinat 56x56 d8", b, (56, 56), 2, 32, (7, 7), (8, 8)),
        Case("1-D 8192 k127", 4, (8192,), 8, 64, (127,), (1,)),
        Case("3-D 16x32x32 k3x7x7", 2, (16, 32, 32), 4, 64, (3, 7, 7), (1, 1, 1)),
    ]


def _flex_fn(case: Case, device: str, compiled: bool, rpb: torch.Tensor | None):
    """FlexAttention over ``[B, H, N, D]`` with the NA window as block mask (and rpb as score_mod)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    tables = []
    for length, ks, dil, causal in zip(case.spatial, case.kernel_size, case.dilation, case.causal):
        key, valid, _ = window_indices(length, ks, dil, causal, device)
        first = key[:, 0]
        last = torch.where(valid, key, -1).amax(1)
        tables.append((length, dil, first, last))

    def coords(idx):
        out = []
        for length, *_ in reversed(tables):
            out.append(idx % length)
            idx = idx // length
        return out[::-1]

    def mask_mod(b, h, q_idx, kv_idx):
        ok = q_idx >= 0
        for (_, dil, first, last), qc, kc in zip(tables, coords(q_idx), coords(kv_idx)):
            ok = ok & (kc % dil == qc % dil) & (kc >= first[qc]) & (kc <= last[qc])
        return ok

    score_mod = None
    if rpb is not None:
        flat_rpb = rpb.reshape(rpb.shape[0], -1)

        def score_mod(score, b, h, q_idx, kv_idx):
            idx = q_idx * 0
            for (_, dil, *_), ks, qc, kc in zip(tables, case.kernel_size, coords(q_idx), coords(kv_idx)):
                idx = idx * (2 * ks - 1) + (kc // dil - qc // dil + ks - 1).clamp(0, 2 * ks - 2)
            return score + flat_rpb[h, idx]

    tokens = math.prod(case.spatial)
    block_mask = create_block_mask(mask_mod, None, None, tokens, tokens, device=device)
    attn = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention

    def run(q, k, v):
        b, *_, h, d = q.shape
        qf, kf, vf = (t.reshape(b, tokens, h, d).transpose(1, 2) for t in (q, k, v))
        with warnings.catch_warnings():  # eager rows are labelled; flex's advice to compile is noise
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out = attn(qf, kf, vf, score_mod=score_mod, block_mask=block_mask, scale=d**-0.5)
        return out.transpose(1, 2).reshape(q.shape)

    return run


def _natten_fn(case: Case):
    import natten

    fn = getattr(natten, f"na{len(case.spatial)}d")
    return lambda q, k, v: fn(
        q, k, v, kernel_size=case.kernel_size, dilation=case.dilation, is_causal=case.causal
    )


def _sdpa(q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA over all tokens of ``[B, *spatial, H, D]`` inputs, with an optional ``[1, 1 or H, N, N]`` mask."""
    b, *_, h, d = q.shape
    qf, kf, vf = (t.reshape(b, -1, h, d).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask).transpose(1, 2).reshape(q.shape)


def _masked_sdpa_fn(case: Case, device: str, dtype: torch.dtype, rpb: torch.Tensor | None):
    """Dense SDPA with the exact neighbourhood (and rpb) as an additive ``[1, 1 or H, N, N]`` mask: NA
    the simplest exact way, and the floor of any path through SDPA on maps about the window's size."""
    key, valid, rel_slot = neighborhood_tables(case.spatial, case.kernel_size, case.dilation, case.causal)
    tokens = key.shape[0]
    pairs = (torch.arange(tokens)[:, None].expand_as(key)[valid], key[valid])  # (query, key) in a window
    window = torch.full((tokens, tokens), float("-inf"), dtype=dtype)
    window[pairs] = 0
    window = window.to(device)
    if rpb is not None:  # flat rpb index of every pair (outside the windows: masked anyway)
        rel = torch.zeros((tokens, tokens), dtype=torch.long)
        rel[pairs] = rel_slot[valid]
        rel = rel.to(device)

    def run(q, k, v):
        bias = window if rpb is None else window + rpb.reshape(q.shape[-2], -1)[:, rel].to(dtype)
        return _sdpa(q, k, v, bias.reshape(1, -1, tokens, tokens))  # [1, 1 or H, N, N]

    return run


def _step(fn: Callable, inputs: list[torch.Tensor], backward: bool) -> Callable[[], object]:
    grad = torch.randn_like(inputs[0])
    detached = [t.detach() for t in inputs[:3]]

    def step():
        if not backward:  # detached too: flex_attention rejects inputs that require grad on CPU
            with torch.no_grad():
                return fn(*detached)
        out = fn(*inputs[:3])
        return torch.autograd.grad(out, inputs, grad, allow_unused=True)

    return step


def _steps(make: Callable[[], Callable] | str, inputs: list[torch.Tensor]):
    """(forward step, forward+backward step) of one provider; for one not run here the reason (a string)
    twice, and steps that raise for one that cannot be built (e.g. NATTEN not installed)."""
    if isinstance(make, str):
        return make, make
    try:
        fn = make()
    except Exception as exc:  # reported in the table by measure_side_by_side

        def failed(error: Exception = exc):
            raise error

        return failed, failed
    return _step(fn, inputs, False), _step(fn, inputs, True)


def _ours(case: Case, rpb: torch.Tensor | None, backend: str):
    return lambda q, k, v: neighborhood_attention(
        q, k, v, case.kernel_size, case.dilation, case.causal, rpb=rpb, backend=backend
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--batch", type=int, help="override the batch size of the 2-D cases")
    parser.add_argument(
        "--rpb", action="store_true", help="add NAT's relative positional bias (not in NATTEN)"
    )
    parser.add_argument("--flex-compile", action="store_true", help="torch.compile flex_attention on CPU too")
    parser.add_argument("--case", default="", help="only run cases whose name contains this text")
    parser.add_argument("--iters", type=int, help="timed iterations (default 20 on CUDA, 10 on CPU)")


def run(args: argparse.Namespace) -> int:
    device = args.device
    cuda = device.startswith("cuda")
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    iters = args.iters or (20 if cuda else 10)
    warmup = 3 if cuda else 2
    no_triton = (
        "Triton is not installed"
        if not triton_available()
        else "Triton runs on a CUDA device (or TRITON_INTERPRET=1)"
        if not (cuda or interpreter_enabled())
        else ""
    )
    rows = []
    for case in _cases("cuda" if cuda else "cpu", args.batch):
        if args.case not in case.name:
            continue
        gen = torch.Generator(device="cpu").manual_seed(0)
        shape = (case.batch, *case.spatial, case.heads, case.head_dim)
        qkv = [torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(3)]
        rpb = None
        if args.rpb and not any(case.causal):
            rpb_shape = (case.heads, *(2 * k - 1 for k in case.kernel_size))
            rpb = (0.02 * torch.randn(rpb_shape, generator=gen)).to(device=device, dtype=dtype)
        inputs = [t.requires_grad_(True) for t in qkv + ([rpb] if rpb is not None else [])]

        flex_compiled = cuda or args.flex_compile
        # a provider is a constructor of its function, or the reason it is not run here
        providers: list[tuple[str, Callable[[], Callable] | str]] = [
            ("visattn triton", no_triton or partial(_ours, case, rpb, "triton")),
            ("visattn torch", partial(_ours, case, rpb, "torch")),
            (
                "flex" if flex_compiled else "flex (eager)",
                partial(_flex_fn, case, device, flex_compiled, rpb),
            ),
            (
                "natten",
                partial(_natten_fn, case) if rpb is None else "NATTEN has no relative positional bias",
            ),
            ("sdpa + window mask", partial(_masked_sdpa_fn, case, device, dtype, rpb)),
            ("sdpa dense", lambda: _sdpa),
        ]
        # the forward and forward+backward calls of every provider take turns in one measurement, so a
        # slow spell of a shared machine hits them alike (measured apart, a forward could read slower than
        # its forward+backward); a provider that cannot run a case gets a note
        steps = [_steps(make, inputs) for _, make in providers]
        timed, notes = measure_side_by_side(
            [s[0] for s in steps] + [s[1] for s in steps], device, warmup, iters
        )
        n = len(providers)
        results = [
            (name, timed[i], timed[n + i], notes[i] or notes[n + i]) for i, (name, _) in enumerate(providers)
        ]
        if cuda:
            torch.cuda.empty_cache()
        mine = next((r for r in results if r[0].startswith("visattn") and r[1] is not None), None)
        for name, fwd, bwd, note in results:
            rows.append(
                [case.name, name, *time_mem_cells(fwd), *time_mem_cells(bwd)]
                + [ratio(fwd, mine[1]) if mine else "-", ratio(bwd, mine[2]) if mine else "-", note]
            )
    title = (
        f"neighborhood attention on {device} ({torch.cuda.get_device_name(device) if cuda else 'cpu'}), "
        f"{str(dtype).removeprefix('torch.')}, rpb={'on' if args.rpb else 'off'}; speed-up = row time / ours"
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
