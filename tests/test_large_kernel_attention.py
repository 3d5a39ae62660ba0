"""large_kernel_attention: Triton (interpreter on CPU) vs the F.conv2d reference, grads, errors, opcheck."""

import pytest
import torch
import torch.nn.functional as F

from visattn.kernels import large_kernel_attention
from visattn.kernels.reference.large_kernel_attention import large_kernel_attention_reference


def _inputs(batch, chans, height, width, k1=5, k2=7, bias=True, dtype=torch.float32, device="cpu"):
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=dtype, device=device) * scale).requires_grad_()

    return [
        rand(batch, chans, height, width),
        rand(chans, 1, k1, k1, scale=0.2),
        rand(chans) if bias else None,
        rand(chans, 1, k2, k2, scale=0.2),
        rand(chans) if bias else None,
        rand(chans, chans, 1, 1, scale=0.5),
        rand(chans) if bias else None,
    ]


def _grads(out, args, grad):
    wrt = [a for a in args if a is not None]
    return torch.autograd.grad(out, wrt, grad)


@pytest.mark.parametrize(
    "shape, k1, k2, dilation, bias",
    [
        ((2, 3, 13, 20), 5, 7, 3, True),  # VAN's LKA, one tile per plane
        ((1, 2, 70, 67), 5, 7, 3, False),  # 2x2 tiles per plane both ways (46 wide fwd, 60 bwd), no biases
        ((2, 2, 9, 11), 3, 5, 2, True),  # other kernel sizes / dilation
    ],
)
def test_triton_matches_reference(shape, k1, k2, dilation, bias):
    args = _inputs(*shape, k1=k1, k2=k2, bias=bias)
    out = large_kernel_attention(*args, dilation=dilation, backend="triton")
    ref = large_kernel_attention_reference(*args, dilation=dilation)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(ref)
    for got, want in zip(_grads(out, args, grad), _grads(ref, args, grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_triton_half_precision():
    args = [a.detach() for a in _inputs(1, 4, 12, 12)]
    half = [a.half().requires_grad_() for a in args]
    out = large_kernel_attention(*half, backend="triton")
    assert out.dtype == torch.float16
    ref = large_kernel_attention_reference(*[a.requires_grad_() for a in args])
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=2e-2 * ref.abs().max().item())
    grad = torch.randn_like(ref)
    for got, want in zip(_grads(out, half, grad.half()), _grads(ref, args, grad)):
        assert got.dtype == torch.float16
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.parametrize(
    "k1, dil1, k2, dil2, bias, add",
    [
        (5, 1, 7, 3, True, False),  # the forward chain: halo 9, 46-wide tiles
        (7, 3, 5, 1, False, True),  # the backward's order: halo 2 (60-wide tiles), first conv reads 9 away
    ],
)
def test_dw_chain_matches_conv2d_composition(k1, dil1, k2, dil2, bias, add):
    # 70x67 planes: 2x2 tiles either way, so halos cross tile borders and the image border
    from visattn.kernels.triton import large_kernel_attention as tk

    chans = 3
    x = torch.randn(1, chans, 70, 67)
    w1, w2 = torch.randn(chans, 1, k1, k1) * 0.2, torch.randn(chans, 1, k2, k2) * 0.2
    b1, b2 = (torch.randn(chans), torch.randn(chans)) if bias else (None, None)
    extra = torch.randn_like(x) if add else None
    out, mid = tk.dw_chain(
        x, w1.reshape(chans, -1), b1, w2.reshape(chans, -1), b2, dil1, dil2, add=extra, keep_mid=True
    )
    want_mid = F.conv2d(x, w1, b1, padding=dil1 * (k1 // 2), dilation=dil1, groups=chans)
    want = F.conv2d(want_mid, w2, b2, padding=dil2 * (k2 // 2), dilation=dil2, groups=chans)
    if add:
        want = want + extra
    torch.testing.assert_close(mid, want_mid, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    out_only, no_mid = tk.dw_chain(x, w1.reshape(chans, -1), b1, w2.reshape(chans, -1), b2, dil1, dil2)
    assert no_mid is None
    torch.testing.assert_close(out_only, want - extra if add else want, rtol=1e-5, atol=1e-5)


def test_auto_on_cpu_is_the_reference():
    args = _inputs(1, 2, 6, 7)
    torch.testing.assert_close(
        large_kernel_attention(*args), large_kernel_attention_reference(*args), rtol=0, atol=0
    )


def test_autocast_casts_like_a_convolution():
    args = _inputs(1, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = large_kernel_attention(*args)
    assert out.dtype == torch.bfloat16
    ref = large_kernel_attention_reference(*args)
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2 * ref.abs().max().item())
    out.float().sum().backward()  # gradients reach the fp32 weights through the casts
    assert args[1].grad is not None and args[1].grad.dtype == torch.float32


def test_reference_gradcheck_float64():
    args = _inputs(1, 2, 5, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda *a: large_kernel_attention(*a, backend="torch"), args, fast_mode=True
    )


def test_reference_matches_official_module_order():
    # the reference is conv0 -> conv_spatial -> conv1 -> u * attn with nn.Conv2d modules as VAN builds them
    chans = 4
    conv0 = torch.nn.Conv2d(chans, chans, 5, padding=2, groups=chans)
    conv_spatial = torch.nn.Conv2d(chans, chans, 7, padding=9, groups=chans, dilation=3)
    conv1 = torch.nn.Conv2d(chans, chans, 1)
    x = torch.randn(2, chans, 11, 9)
    want = x * conv1(conv_spatial(conv0(x)))
    got = large_kernel_attention(
        x, conv0.weight, conv0.bias, conv_spatial.weight, conv_spatial.bias, conv1.weight, conv1.bias
    )
    torch.testing.assert_close(got, want)


def test_opcheck_custom_ops():
    args = [a.detach() for a in _inputs(1, 2, 5, 6)]
    torch.library.opcheck(torch.ops.visattn.large_kernel_attention_fwd.default, (*args, 3))
    out, d = torch.ops.visattn.large_kernel_attention_fwd(*args, 3)
    torch.library.opcheck(
        torch.ops.visattn.large_kernel_attention_bwd.default,
        (torch.randn_like(out), None, args[0], d, *args[1:], 3),
    )


def test_torch_compile_fullgraph_triton():
    args = [a.detach() for a in _inputs(1, 2, 6, 6)]
    fn = torch.compile(
        lambda *a: large_kernel_attention(*a, backend="triton"), backend="eager", fullgraph=True
    )
    torch.testing.assert_close(fn(*args), large_kernel_attention_reference(*args), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.__setitem__(0, a[0][0]), r"x must be laid out as \[B, C, H, W\]"),
        (lambda a: a.__setitem__(1, torch.randn(3, 1, 4, 4)), "dw_weight must be a depthwise kernel"),
        (lambda a: a.__setitem__(3, torch.randn(2, 1, 7, 7)), "dwd_weight must be a depthwise kernel"),
        (lambda a: a.__setitem__(5, torch.randn(3, 3, 3, 3)), r"pw_weight must be a 1x1 conv kernel"),
        (lambda a: a.__setitem__(6, torch.randn(4)), r"pw_bias must have shape \[C\]"),
        (lambda a: a.__setitem__(2, torch.randn(3, dtype=torch.float64)), "dw_bias has dtype"),
        (lambda a: a.__setitem__(0, torch.randn(1, 3, 0, 4)), "non-zero"),
    ],
)
def test_bad_arguments(change, match):
    args = [a.detach() for a in _inputs(1, 3, 6, 6)]
    change(args)
    with pytest.raises(ValueError, match=match):
        large_kernel_attention(*args)


def test_bad_dilation_backend_and_dtype():
    args = [a.detach() for a in _inputs(1, 2, 6, 6)]
    with pytest.raises(ValueError, match="dilation must be a positive int"):
        large_kernel_attention(*args, dilation=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        large_kernel_attention(*args, backend="cuda")
    with pytest.raises(ValueError, match="float64"):
        large_kernel_attention(*[a.double() for a in args], backend="triton")


@pytest.mark.cuda
def test_cuda_autocast_triton():
    args = _inputs(2, 32, 28, 28, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = large_kernel_attention(*args, backend="triton")
    assert out.dtype == torch.bfloat16
    ref = large_kernel_attention_reference(*args)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    out.float().sum().backward()
    assert all(a.grad is not None and a.grad.dtype == torch.float32 for a in args)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_van_b2_stage_shapes(dtype):
    args = _inputs(4, 64, 56, 56, dtype=dtype, device="cuda")
    out = large_kernel_attention(*args, backend="triton")
    ref = large_kernel_attention_reference(*[a.float() for a in args])
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    grad = torch.randn_like(out)
    for got, want in zip(_grads(out, args, grad), _grads(ref, [a.float() for a in args], grad.float())):
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_bench_runs_on_cpu(capsys):
    import argparse

    from visattn.bench import lka

    parser = argparse.ArgumentParser()
    lka.add_arguments(parser)
    lka.run(
        parser.parse_args(
            ["--device", "cpu", "--batch", "1", "--img-size", "32", "--warmup", "0", "--iters", "1"]
        )
    )
    out = capsys.readouterr().out
    assert "VAN-B2 stages at 32x32" in out
    assert out.count("official nn.Conv2d") == 5  # title + one row per stage


_COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from visattn.kernels.triton import large_kernel_attention as tk

def compile_(fn, consts, dtype):
    sig = {name: "constexpr" if name in consts else ("i32" if not name.endswith("_ptr") else
           "*fp32" if name in ("scratch_ptr", "partial_ptr") else "*" + dtype) for name in fn.arg_names}
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": 4})

c = dict(K1=5, DIL1=1, K2=7, DIL2=3, PB=1, RH=64, RW=64, HAS_B1=True, HAS_B2=True, HAS_ADD=False,
         STORE_MID=False)
compile_(tk._dw_chain_kernel, c, "bf16")
c = dict(K1=7, DIL1=3, K2=5, DIL2=1, PB=1, RH=64, RW=64, HAS_B1=False, HAS_B2=False, HAS_ADD=True,
         STORE_MID=True)
compile_(tk._dw_chain_kernel, c, "bf16")
compile_(tk._dwconv_kernel, dict(K=5, DIL=1, HAS_BIAS=True, PB=1, BLOCK_H=32, BLOCK_W=64), "bf16")
compile_(tk._dwconv_wgrad_kernel, dict(K=7, DIL=3, PB=1, BLOCK_H=32, BLOCK_W=64), "bf16")
for dtype, precision in (("bf16", "ieee"), ("fp32", "tf32")):
    c = dict(HAS_BIAS=True, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, PRECISION=precision)
    compile_(tk._pointwise_gate_kernel, c, dtype)
"""


def test_kernels_compile_for_a_gpu_target():
    # The interpreter does not lower the kernels; compiling them for sm_90 (no GPU needed) catches what
    # only the GPU compiler rejects. A subprocess, because TRITON_INTERPRET=1 is set in this one.
    import os
    import subprocess
    import sys

    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton has no NVIDIA backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
