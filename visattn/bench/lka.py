"""Large-kernel attention (VAN's LKA): fused Triton op vs the official nn.Conv2d chain, VAN-B2 stages.

Times the forward and forward+backward (median ms) and the peak memory above the inputs (CUDA
allocator, or the profiler on CPU) of ``visattn.kernels.large_kernel_attention`` at the four LKA
shapes of VAN-B2 (64/128/320/512 channels at 1/4, 1/8, 1/16, 1/32 of the image size), against the
official implementation's approach: three ``nn.Conv2d`` modules (depthwise 5x5, depthwise 7x7 dilation
3, 1x1, i.e. cuDNN) and ``u * attn``. Rows:

- ``official nn.Conv2d``: the baseline every ratio refers to (measured in the same run);
- ``visattn triton``: the op (both depthwise convs in one kernel, 1x1 GEMM with the gating product
  in its epilogue; Triton backward);
- ``triton 2-kernel (fwd)``: the same forward with the two depthwise convs as two separate Triton
  kernels, to show what fusing them is worth;
- ``visattn reference``: the op's ``F.conv2d`` reference.

``--device cpu`` uses a small batch and image; the Triton rows need CUDA and read "n/a" there.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn as nn

from visattn.bench._timing import fmt_mem, fmt_ms, measure, measure_or_none, print_table, ratio
from visattn.kernels import large_kernel_attention

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
VAN_B2_DIMS = (64, 128, 320, 512)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU"
    )
    parser.add_argument("--batch", type=int, default=None, help="default: 64 on CUDA, 2 on CPU")
    parser.add_argument("--img-size", type=int, default=None, help="default: 224 on CUDA, 64 on CPU")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)


class OfficialLKA(nn.Module):
    """The official ``AttentionModule``'s computation (three nn.Conv2d, ``u * attn``), written here."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv0 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv_spatial = nn.Conv2d(dim, dim, 7, padding=9, groups=dim, dilation=3)
        self.conv1 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone() * self.conv1(self.conv_spatial(self.conv0(x)))

    def op_args(self) -> tuple:
        return (self.conv0.weight, self.conv0.bias, self.conv_spatial.weight, self.conv_spatial.bias,
                self.conv1.weight, self.conv1.bias)  # fmt: skip


def _two_kernel_forward(x: torch.Tensor, m: OfficialLKA) -> torch.Tensor:
    from visattn.kernels.triton import large_kernel_attention as tk

    chans = x.shape[1]
    a = tk.dwconv(x, m.conv0.weight.reshape(chans, -1), m.conv0.bias)
    d = tk.dwconv(a, m.conv_spatial.weight.reshape(chans, -1), m.conv_spatial.bias, dilation=3)
    return tk.pointwise_gate(m.conv1.weight.reshape(chans, chans), m.conv1.bias, d, x)


def _impls(module: OfficialLKA, on_cuda: bool) -> dict[str, tuple[Callable | None, bool]]:
    """name -> (fn(x), has backward)."""
    triton_fn = (
        (lambda x: large_kernel_attention(x, *module.op_args(), backend="triton")) if on_cuda else None
    )
    return {
        "official nn.Conv2d": (module, True),
        "visattn triton": (triton_fn, True),
        "triton 2-kernel (fwd)": ((lambda x: _two_kernel_forward(x, module)) if on_cuda else None, False),
        "visattn reference": (lambda x: large_kernel_attention(x, *module.op_args(), backend="torch"), True),
    }


def _time(fn: Callable, x: torch.Tensor, params: list, backward: bool, device: str, warmup: int, iters: int):
    grad = torch.randn_like(x)

    def step():
        if not backward:
            with torch.no_grad():
                return fn(x)
        return torch.autograd.grad(fn(x), [x, *params], grad)

    return measure_or_none(lambda: measure(step, device, warmup=warmup, iters=iters))


def run(args: argparse.Namespace) -> None:
    device = args.device
    on_cuda = device.startswith("cuda")
    dtype = DTYPES[args.dtype or ("bf16" if on_cuda else "fp32")]
    batch = args.batch or (64 if on_cuda else 2)
    img = args.img_size or (224 if on_cuda else 64)
    warmup = args.warmup if args.warmup is not None else (10 if on_cuda else 1)
    iters = args.iters if args.iters is not None else (50 if on_cuda else 3)
    rows = []
    for stage, dim in enumerate(VAN_B2_DIMS):
        size = img // (4 * 2**stage)
        torch.manual_seed(0)
        module = OfficialLKA(dim).to(device, dtype)
        params = list(module.parameters())
        x = torch.randn(batch, dim, size, size, device=device, dtype=dtype, requires_grad=True)
        results = {}
        for name, (fn, has_bwd) in _impls(module, on_cuda).items():
            results[name] = [
                None
                if fn is None or (bwd and not has_bwd)
                else _time(fn, x, params, bwd, device, warmup, iters)
                for bwd in (False, True)
            ]
        base = results["official nn.Conv2d"]
        for name, (fwd, fwdbwd) in results.items():
            label = f"stage{stage + 1} {dim}x{size}x{size}"
            rows.append([label, name, fmt_ms(fwd), fmt_ms(fwdbwd), fmt_mem(fwd), fmt_mem(fwdbwd),
                         ratio(base[0], fwd), ratio(base[1], fwdbwd)])  # fmt: skip
    name = torch.cuda.get_device_name(device) if on_cuda else "cpu"
    print_table(
        ["stage", "impl", "fwd ms", "fwd+bwd ms", "fwd MiB", "fwd+bwd MiB", "fwd speed-up", "f+b speed-up"],
        rows,
        title=f"large_kernel_attention, VAN-B2 stages at {img}x{img}, batch {batch}, "
        f"{str(dtype).replace('torch.', '')} on {name} (speed-ups vs official nn.Conv2d)",
    )
