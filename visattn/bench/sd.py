"""Stable Diffusion UNet forward with and without AgentSD (visattn.integrations.diffusers).

Times one UNet2DConditionModel forward (random weights built from the SD 1.5 config, no download) at
64x64 latents (512x512 images), batch 2 (one prompt with classifier-free guidance), fp16 on CUDA:
the stock processors, AgentSD's early phase (ToMe r=0.4 + agent attention, sx=sy=4, agent_ratio=0.95),
its late phase (ToMe only, sx=sy=2) and agent attention without merging. ``--device cpu`` uses a tiny
UNet config at 32x32 latents in float32.
"""

from __future__ import annotations

import argparse

import torch

from visattn.bench._timing import measure, print_table, ratio

SD15_CONFIG = dict(cross_attention_dim=768, attention_head_dim=8)  # the rest: UNet2DConditionModel defaults
TINY_CONFIG = dict(
    block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        default=None,
        help="default: float16 on CUDA, float32 on CPU",
    )
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one prompt with CFG)")
    parser.add_argument("--latent", type=int, default=None, help="latent side; default 64 (CUDA) / 32 (CPU)")
    parser.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "triton", "torch"),
        help="backend of visattn.kernels.agent_attention",
    )
    parser.add_argument("--warmup", type=int, default=None, help="default: 3 (CUDA) / 1 (CPU)")
    parser.add_argument("--iters", type=int, default=None, help="default: 10 (CUDA) / 3 (CPU)")


def run(args: argparse.Namespace) -> int:
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    from visattn.integrations.diffusers import AgentSDPhase, apply_agent_attention, remove_agent_attention

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("float16" if cuda else "float32"))
    latent = args.latent or (64 if cuda else 32)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    iters = args.iters if args.iters is not None else (10 if cuda else 3)
    config = SD15_CONFIG if cuda else TINY_CONFIG
    diffusers_logging.set_verbosity_error()  # random-weight UNet: no advice about from_pretrained dtypes
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).to(device=device, dtype=dtype).eval()
    sample = torch.randn(args.batch, unet.config.in_channels, latent, latent, device=device, dtype=dtype)
    context = torch.randn(args.batch, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    timestep = torch.tensor([500], device=device)

    def forward() -> None:
        with torch.inference_mode():
            unet(sample, timestep, encoder_hidden_states=context)

    variants = [
        ("stock processors", None),
        ("AgentSD early (ToMe 0.4 + agents, s4)", AgentSDPhase(0, 0.4, 0.95, 4, 4)),
        ("AgentSD late (ToMe 0.4, s2)", AgentSDPhase(0, 0.4, 0.5, 2, 2)),
        ("agents only (no merge, s4)", AgentSDPhase(0, 0.0, 0.95, 4, 4)),
    ]
    rows, baseline = [], None
    for label, phase in variants:
        if phase is not None:
            apply_agent_attention(unet, phase, seed=0, backend=args.backend)
        try:
            result = measure(forward, device, warmup=warmup, iters=iters)
        except ValueError as err:  # e.g. a backend that cannot run on this device
            rows.append((label, "-", "-", f"unavailable: {err}"))
            continue
        finally:
            remove_agent_attention(unet)
        baseline = baseline or result
        rows.append((label, f"{result.ms:.2f}", f"{result.peak_mib:.0f}", ratio(baseline, result)))
    title = (
        f"UNet forward, {'SD 1.5' if cuda else 'tiny'} config, batch {args.batch}, "
        f"{latent}x{latent} latents, {str(dtype).removeprefix('torch.')}, {device.type}, "
        f"agent_attention backend={args.backend}"
    )
    print_table(("variant", "ms", "peak MiB", "speed-up"), rows, title=title)
    return 0
