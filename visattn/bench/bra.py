"""Bi-level routing attention: Triton op vs PyTorch op vs official-style gather; biformer_s training step.

Part 1 times the forward and forward+backward (median ms) and the peak memory above the inputs (CUDA
allocator, or the profiler on CPU) of ``visattn.kernels.bilevel_routing_attention`` with the Triton
and the PyTorch backends and of an implementation that follows the official BiFormer code's approach
(per-region layout, ``torch.gather`` of the routed K/V regions from an expanded view, i.e. ``topk``
copies of K and V, then dense attention over the gathered tokens), on the BRA stages of BiFormer-S
(56/28/14 grids at 224x224, 7x7 regions, top-k 1/4/16, 2/4/8 heads of 32). Part 2 times one training
step (forward, backward, AdamW step; bf16 autocast on CUDA) of the whole ``biformer_s`` with each
attention implementation and reports img/s and peak memory. Ratios are against the official-style rows
measured in the same run. ``--device cpu`` uses small sizes and a shallow, narrow biformer_s for the
training step (Triton needs CUDA there, so its rows read "n/a")."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch

import visattn  # noqa: F401  (registers biformer_s)
from visattn.backbones.biformer import BiLevelRoutingAttention
from visattn.bench._timing import (
    Measurement,
    fmt_mem,
    fmt_ms,
    measure,
    measure_or_none,
    measure_side_by_side,
    print_table,
    ratio,
)
from visattn.kernels import bilevel_routing_attention
from visattn.kernels.ops.dispatch import interpreter_enabled, triton_available

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Stage:
    name: str
    size: int
    heads: int
    topk: int
    regions: int = 7
    head_dim: int = 32


def _stages(img: int) -> list[Stage]:
    return [
        Stage(f"stage1 {img // 4}x{img // 4} top1", img // 4, 2, 1),
        Stage(f"stage2 {img // 8}x{img // 8} top4", img // 8, 4, 4),
        Stage(f"stage3 {img // 16}x{img // 16} top16", img // 16, 8, 16),
    ]


def official_style_bra(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_regions: int, topk: int, scale: float
) -> torch.Tensor:
    """BRA the way the official code computes it, from the paper's description (no masking, so
    H and W must be multiples of ``num_regions``). q, k ``[B, H, W, heads, d]``, v ``[B, H, W, heads, dv]``.

    Per-region layout; region means of q/k (detached) route by ``topk`` of their affinity; the
    routed regions of the fused K|V tensor are gathered from an expanded view (a materialised
    ``[B, R, topk, T, C]`` copy); dense softmax attention over the ``topk * T`` gathered tokens.
    """
    b, h, w, heads, d = q.shape
    s = num_regions
    rh, rw = h // s, w // s

    def regions(t):  # [B, H, W, heads, c] -> [B, R, T, heads*c]
        return t.reshape(b, s, rh, s, rw, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, s * s, rh * rw, -1)

    q_r, kv_r = regions(q), regions(torch.cat([k, v], dim=-1))
    n_reg, tokens, c_kv = kv_r.shape[1:]
    with torch.no_grad():
        q_mean = q_r.detach().mean(2)
        k_mean = kv_r.detach().unflatten(-1, (heads, -1))[..., :d].flatten(-2).mean(2)
        route = torch.topk((q_mean * scale) @ k_mean.transpose(-2, -1), k=topk, dim=-1).indices
    kv_sel = torch.gather(
        kv_r[:, None].expand(-1, n_reg, -1, -1, -1),
        dim=2,
        index=route[..., None, None].expand(-1, -1, -1, tokens, c_kv),
    )  # [B, R, topk, T, heads*(d+dv)]
    kv_sel = kv_sel.reshape(b * n_reg, topk * tokens, heads, -1).transpose(1, 2)
    k_sel, v_sel = kv_sel[..., :d], kv_sel[..., d:]
    q_h = q_r.reshape(b * n_reg, tokens, heads, d).transpose(1, 2)
    attn = ((q_h * scale) @ k_sel.transpose(-2, -1)).softmax(dim=-1)
    out = (attn @ v_sel).transpose(1, 2)  # [B*R, T, heads, dv]
    out = out.reshape(b, s, s, rh, rw, heads, -1).permute(0, 1, 3, 2, 4, 5, 6)
    return out.reshape(b, h, w, heads, -1)


class _OfficialStyleBRA(BiLevelRoutingAttention):
    """The model's attention module with the attention core swapped for :func:`official_style_bra`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split([self.qk_dim, self.qk_dim, self.dim], dim=-1)
        heads = self.num_heads
        out = official_style_bra(
            q.unflatten(-1, (heads, -1)),
            k.unflatten(-1, (heads, -1)),
            v.unflatten(-1, (heads, -1)),
            self.n_win,
            self.topk,
            self.scale,
        ).flatten(-2)
        out = out + self.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj(out)


# why the Triton rows are not run where run() leaves them out
_NO_TRITON = "needs Triton, a CUDA device and TRITON_INTERPRET unset"


def _op_impls(run_triton: bool) -> dict[str, Callable | None]:
    return {
        "visattn triton": (lambda q, k, v, st: bilevel_routing_attention(q, k, v, st.regions, st.topk,
                                                                        backend="triton"))
        if run_triton
        else None,
        "visattn torch": lambda q, k, v, st: bilevel_routing_attention(q, k, v, st.regions, st.topk,
                                                                           backend="torch"),
        "official-style gather": lambda q, k, v, st: official_style_bra(q, k, v, st.regions, st.topk,
                                                                        st.head_dim**-0.5),
    }  # fmt: skip


def _op_step(fn, inputs, st, backward):
    grad = torch.randn_like(inputs[2])

    def step():
        if not backward:
            with torch.no_grad():
                return fn(*inputs, st)
        return torch.autograd.grad(fn(*inputs, st), inputs, grad)

    return step


def _mem_ratio(baseline: Measurement | None, candidate: Measurement | None) -> str:
    if baseline is None or candidate is None or not baseline.peak_mib:
        return "-"
    return f"{candidate.peak_mib / baseline.peak_mib:.2f}"


def _print_tiles(img_size: int, batch: int) -> None:
    """The Triton kernels' tiling on a GPU at each stage: the plan that
    ``bilevel_routing_attention_forward`` / ``_backward`` launch."""
    from visattn.kernels.triton.bilevel_routing_attention import tile_plan

    rows = []
    for st in _stages(img_size):
        shape = (batch, st.size, st.size, st.heads, st.head_dim)
        plan = tile_plan(shape, st.regions, st.topk, interpreted=False)
        rows.append(
            [st.name, plan.tokens, plan.block, plan.key_block, plan.tiles, f"{plan.real_fraction:.0%}",
             f"{plan.worst:.0%}"]
        )  # fmt: skip
    print_table(
        ["stage", "tokens/region", "tile rows", "key block", "tiles", "real rows", "worst tile"],
        rows,
        title=f"Triton BRA tiles on a GPU, batch {batch} (regions and heads packed into each tile)",
    )


def _bench_ops(args, device, dtype, run_triton, warmup, iters) -> None:
    batch = args.batch or (64 if device.startswith("cuda") else 1)
    if triton_available():
        _print_tiles(args.img_size, batch)
    rows = []
    for st in _stages(args.img_size):
        gen = torch.Generator().manual_seed(0)
        shape = (batch, st.size, st.size, st.heads, st.head_dim)
        inputs = [torch.randn(shape, generator=gen).to(device, dtype).requires_grad_(True) for _ in range(3)]
        impls = _op_impls(run_triton)
        # the forward and forward+backward calls of every implementation take turns in one measurement,
        # so a slow spell of a shared machine hits them alike
        steps = [
            _op_step(fn, inputs, st, backward) if fn is not None else _NO_TRITON
            for backward in (False, True)
            for fn in impls.values()
        ]
        timed, notes = measure_side_by_side(steps, device, warmup, iters)
        n = len(impls)
        for i, name in enumerate(impls):
            if notes[i] or notes[n + i]:
                print(f"  {st.name} {name}: {notes[i] or notes[n + i]}", flush=True)
        results = {name: (timed[i], timed[n + i]) for i, name in enumerate(impls)}
        base = results["official-style gather"]
        for name, (fwd, fwdbwd) in results.items():
            rows.append(
                [st.name, name, fmt_ms(fwd), fmt_ms(fwdbwd), fmt_mem(fwd), fmt_mem(fwdbwd),
                 ratio(base[0], fwd), ratio(base[1], fwdbwd), _mem_ratio(base[1], fwdbwd)]
            )  # fmt: skip
        del inputs
    print_table(
        ["stage", "impl", "fwd ms", "fwd+bwd ms", "fwd MiB", "fwd+bwd MiB", "fwd speed-up", "f+b speed-up",
         "f+b mem ratio"],
        rows,
        title=f"bilevel_routing_attention, BiFormer-S stages at {args.img_size}x{args.img_size}, "
        f"batch {batch}, {str(dtype).replace('torch.', '')} on {_device_name(device)} "
        "(ratios vs official-style gather)",
    )  # fmt: skip


# On CPU the whole BiFormer-S takes seconds per step on small machines: a shallow, narrow
# variant with the same attention layout stands in for it there.
CPU_MODEL_KWARGS = dict(depths=(1, 1, 2, 1), embed_dims=(32, 64, 128, 256))


def _model(kind: str, device: str) -> torch.nn.Module:
    kwargs = {} if device.startswith("cuda") else CPU_MODEL_KWARGS
    model = timm.create_model("biformer_s", **kwargs).to(device)
    for module in model.modules():
        if isinstance(module, BiLevelRoutingAttention):
            if kind == "official-style gather":
                module.__class__ = _OfficialStyleBRA
            else:
                module.backend = "triton" if kind == "visattn triton" else "torch"
    return model.train()


def _bench_model(args, device, run_triton, warmup, iters) -> None:
    cuda = device.startswith("cuda")
    batch = args.model_batch or (64 if cuda else 2)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, args.img_size, args.img_size, generator=gen).to(device)
    labels = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    rows = []
    results = {}
    kinds = (["visattn triton"] if run_triton else []) + ["visattn torch", "official-style gather"]
    for kind in kinds:
        model = _model(kind, device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

        def step(model=model, opt=opt, amp=amp):
            with amp:
                loss = torch.nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        results[kind] = measure_or_none(lambda step=step: measure(step, device, warmup=warmup, iters=iters))
        del model, opt
        if cuda:
            torch.cuda.empty_cache()
    base = results["official-style gather"]
    for kind, m in results.items():
        ips = "n/a" if m is None else f"{batch / (m.ms / 1e3):.1f}"
        rows.append(
            [
                kind,
                "n/a" if m is None else f"{m.ms:.1f}",
                ips,
                fmt_mem(m),
                ratio(base, m),
                _mem_ratio(base, m),
            ]
        )
    print_table(
        ["attention", "step ms", "img/s", "peak MiB", "speed-up", "mem ratio"],
        rows,
        title=f"biformer_s{'' if cuda else f' {CPU_MODEL_KWARGS}'} training step "
        f"(fwd+bwd+AdamW{', bf16 autocast' if cuda else ''}), batch {batch}, "
        f"{args.img_size}x{args.img_size} on {_device_name(device)} (ratios vs official-style gather)",
    )


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="op dtype: default bf16 on CUDA, fp32 on CPU")
    parser.add_argument(
        "--img-size", type=int, help="image side (multiple of 112); default 224 on CUDA, 112 on CPU"
    )
    parser.add_argument("--batch", type=int, help="op batch (default 64 on CUDA, 1 on CPU)")
    parser.add_argument("--model-batch", type=int, help="training batch (default 64 on CUDA, 2 on CPU)")
    parser.add_argument("--iters", type=int, help="timed iterations (default 20 on CUDA, 3 on CPU)")
    parser.add_argument("--skip-model", action="store_true", help="only the op table")


def run(args: argparse.Namespace) -> int:
    device = args.device
    cuda = device.startswith("cuda")
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    args.img_size = args.img_size or (224 if cuda else 112)
    if args.img_size % 112:
        raise SystemExit("--img-size must be a multiple of 112 (7x7 regions on the 1/16 map)")
    iters = args.iters or (20 if cuda else 3)
    warmup = 3 if cuda else 1
    run_triton = triton_available() and cuda and not interpreter_enabled()
    _bench_ops(args, device, dtype, run_triton, warmup, iters)
    if not args.skip_model:
        _bench_model(args, device, run_triton, warmup, iters if cuda else 2)
    return 0
