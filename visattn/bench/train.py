"""Training throughput: images/s and peak memory of forward + backward + AdamW step per model.

On CUDA the step runs under bf16 autocast (``--amp none`` for fp32) at the model's default
input size; on CPU use small sizes, e.g.
``visattn bench train --model van_b0 --device cpu --batch-size 4 --img-size 64 --tiny``.
``--tiny`` shrinks each model to a 2-stage toy (for smoke runs, not for numbers). ``--compile`` prints
another table instead: each model's step eager and under ``torch.compile`` (inductor, as timm's
``train.py --torchcompile``), beside timm's Swin-T and ConvNeXt-T compiled the same way, with the
compile seconds (:mod:`visattn.bench._compile`).
"""

from __future__ import annotations

import argparse
from functools import partial

import timm
import torch

from visattn.bench._compile import COMPILE_HEADERS, compare_compiled
from visattn.bench._timing import measure, print_table
from visattn.recipes.trainer import to_channels_last

TINY_KWARGS: dict[str, dict] = {
    "nat": dict(embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8], kernel_size=3, mlp_ratio=2),
    "dinat": dict(
        embed_dim=32,
        depths=[1, 1, 1, 1],
        num_heads=[1, 2, 4, 8],
        kernel_size=3,
        mlp_ratio=2,
        dilations=[[1], [1], [1], [1]],
    ),
    "biformer": dict(
        embed_dims=[32, 64, 128, 256],
        depths=[1, 1, 1, 1],
        n_win=2,
        topks=[1, 2, -2, -2],
        head_dim=16,
        mlp_ratios=[2, 2, 2, 2],
    ),
    "van": dict(embed_dims=[16, 32, 64, 128], depths=[1, 1, 1, 1], mlp_ratios=[2, 2, 2, 2]),
    "agent_swin": dict(embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8], agent_num=[4, 4, 4, 1]),
    "agent_pvt": dict(
        embed_dims=[32, 64, 128, 256], depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8], agent_num=[4, 4, 4, 1]
    ),
    "agent_deit": dict(embed_dim=64, depth=2, num_heads=2, agent_num=[4, 4, 4, 4]),
    # timm's peers of the `bench models --compile` table
    "swin": dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8)),
    "convnext": dict(depths=(1, 1, 1, 1), dims=(32, 64, 128, 256)),
}
COMPILE_PEERS = ("swin_tiny_patch4_window7_224", "convnext_tiny")


def tiny_kwargs(name: str, img_size: int) -> dict:
    """Toy-size constructor kwargs for ``name`` (by family prefix), including ``img_size`` where needed."""
    for prefix in sorted(TINY_KWARGS, key=len, reverse=True):
        if name.startswith(prefix):
            kwargs = dict(TINY_KWARGS[prefix])
            if prefix.startswith("agent"):
                kwargs["img_size"] = img_size
                if prefix == "agent_swin":
                    kwargs["window_size"] = img_size // 4
                if prefix == "agent_deit":
                    kwargs["patch_size"] = 4
            if prefix == "swin":
                kwargs.update(img_size=img_size, window_size=img_size // 32)
            return kwargs
    raise ValueError(f"no tiny configuration for {name!r}; known families: {', '.join(TINY_KWARGS)}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", nargs="+", required=True, help="model names (visattn list shows them)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--img-size", type=int, default=None, help="default: the model's input size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--amp", default="bf16", choices=["bf16", "fp16", "none"], help="autocast dtype on CUDA"
    )
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="toy-size models (smoke runs)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="eager vs torch.compile (inductor) training steps, beside swin_tiny / convnext_tiny",
    )


def _train_step_fn(model, x, y, amp: str, device: torch.device):
    """One forward + backward + AdamW step of ``model`` on ``x [B, 3, H, W]``, ``y [B]``; returns the loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _builder(name: str, args: argparse.Namespace, device: torch.device):
    """``(build, img)``: a function that builds ``name`` with the same weights on every call, and its
    input size."""
    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}; see `visattn list`")
    probe = timm.create_model(name, pretrained=False) if not args.tiny else None
    img = args.img_size or (probe.pretrained_cfg["input_size"][-1] if probe is not None else 32)
    kwargs = tiny_kwargs(name, img) if args.tiny else {}

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=1000, **kwargs).to(device).train()
        if args.grad_checkpointing:
            model.set_grad_checkpointing(True)
        if args.channels_last:
            to_channels_last(model)
        return model

    return build, img


def _batch(args: argparse.Namespace, img: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, img, img, generator=gen).to(device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 1000, (args.batch_size,), generator=gen).to(device)


def _run_compile(args: argparse.Namespace, device: torch.device, amp: str) -> None:
    """Eager vs inductor training steps for the timm peers, then every model asked for. No loss column:
    inductor draws its own random numbers, so stochastic depth and dropout drop other paths than eager
    (the model battery checks compiled logits against eager in eval mode)."""
    rows = []
    for name in (*COMPILE_PEERS, *args.model):
        build, img = _builder(name, args, device)
        x, y = _batch(args, img, device)
        step = partial(_train_step_fn, x=x, y=y, amp=amp, device=device)
        result = compare_compiled(build, step, device, args.warmup, args.iters)
        source = "timm" if name in COMPILE_PEERS else "visattn"
        rows.append([name, source, img, *result.cells(args.batch_size)])
    print_table(
        ["model", "from", "img", *COMPILE_HEADERS],
        rows,
        title=f"training step (forward + backward + AdamW){' (tiny models)' if args.tiny else ''}, eager vs "
        f"torch.compile (inductor), batch {args.batch_size}, amp {amp}, on {device} (compile s: the "
        "compiled copy's first step)",
    )


def run(args: argparse.Namespace) -> None:
    import visattn  # noqa: F401  (registers the models)

    device = torch.device(args.device)
    amp = args.amp if device.type == "cuda" else "none"
    if args.compile:
        return _run_compile(args, device, amp)
    rows: list[list[object]] = []
    for name in args.model:
        build, img = _builder(name, args, device)
        model = build()
        x, y = _batch(args, img, device)
        m = measure(_train_step_fn(model, x, y, amp, device), device, args.warmup, args.iters)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        rows.append(
            [
                name,
                f"{params:.1f}",
                img,
                args.batch_size,
                amp,
                f"{m.ms:.1f}",
                f"{args.batch_size * 1000 / m.ms:.1f}",
                f"{m.peak_mib:.0f}",
            ]
        )
        del model, x, y
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(
        ["model", "params (M)", "img", "batch", "amp", "ms/step", "img/s", "peak MiB"],
        rows,
        title=f"training step (forward + backward + AdamW) on {device}",
    )
