"""Large-kernel attention (LKA) of VAN (Guo et al., "Visual Attention Network", arXiv 2202.09741).

``out = x * conv1x1(dwconv_dilated(dwconv(x)))``: a depthwise ``k1 x k1`` convolution
(VAN: 5x5, padding 2), a depthwise ``k2 x k2`` convolution with ``dilation`` (VAN: 7x7,
dilation 3, padding 9), a 1x1 convolution, and the product with the input.

Layout: channels-first ``[B, C, H, W]`` like VAN (not the ``[batch, *spatial, heads, head_dim]``
of the attention ops: LKA has no heads and its convolutions run over channel planes).

Backends (``visattn.kernels.ops.dispatch``): ``"torch"`` and ``"reference"`` run the ``F.conv2d``
reference; ``"triton"`` runs the fused kernels of :mod:`visattn.kernels.triton.large_kernel_attention`
through the ``visattn::large_kernel_attention_fwd`` / ``_bwd`` custom ops (fake
implementations and autograd registered, so they trace under ``torch.compile``). Both directions
fuse the two depthwise convolutions into one kernel: the forward chain ``dwconv -> dwconv_dilated``,
and the backward's input-gradient chain (the flipped dilated kernel, then the flipped first kernel,
plus the direct ``grad * attn`` term), which also writes the intermediate gradient that the first
convolution's weight gradient needs.
"""

from __future__ import annotations

import torch

from visattn.kernels.ops.checks import check_float_tensors, check_ndim
from visattn.kernels.ops.dispatch import resolve_backend, triton_limit
from visattn.kernels.reference.large_kernel_attention import large_kernel_attention_reference

OP = "large_kernel_attention"


def _check_depthwise(name: str, weight: torch.Tensor, channels: int) -> int:
    shape = tuple(weight.shape)
    if weight.ndim != 4 or shape[0] != channels or shape[1] != 1 or shape[2] != shape[3] or shape[2] % 2 == 0:
        raise ValueError(
            f"{OP}: {name} must be a depthwise kernel of shape [C, 1, k, k] with C={channels} and odd k, "
            f"got {shape}"
        )
    return shape[2]


def _check_args(x, dw_weight, dw_bias, dwd_weight, dwd_bias, pw_weight, pw_bias, dilation) -> None:
    tensors = {"x": x, "dw_weight": dw_weight, "dwd_weight": dwd_weight, "pw_weight": pw_weight}
    tensors.update(
        {
            n: t
            for n, t in (("dw_bias", dw_bias), ("dwd_bias", dwd_bias), ("pw_bias", pw_bias))
            if t is not None
        }
    )
    check_float_tensors(OP, **tensors)
    check_ndim(OP, "x", x, (4,), "[B, C, H, W]")
    batch, channels, height, width = x.shape
    if min(batch, channels, height, width) == 0:
        raise ValueError(f"{OP}: x must have non-zero batch, channels and spatial size, got {tuple(x.shape)}")
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"{OP}: dilation must be a positive int, got {dilation!r}")
    _check_depthwise("dw_weight", dw_weight, channels)
    _check_depthwise("dwd_weight", dwd_weight, channels)
    if tuple(pw_weight.shape) != (channels, channels, 1, 1):
        raise ValueError(
            f"{OP}: pw_weight must be a 1x1 conv kernel of shape [C, C, 1, 1] with C={channels}, "
            f"got {tuple(pw_weight.shape)}"
        )
    for name, bias in (("dw_bias", dw_bias), ("dwd_bias", dwd_bias), ("pw_bias", pw_bias)):
        if bias is not None and tuple(bias.shape) != (channels,):
            raise ValueError(
                f"{OP}: {name} must have shape [C] = ({channels},) or be None, got {tuple(bias.shape)}"
            )


@torch.library.custom_op("visattn::large_kernel_attention_fwd", mutates_args=())
def _triton_fwd(
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_bias: torch.Tensor | None,
    dwd_weight: torch.Tensor,
    dwd_bias: torch.Tensor | None,
    pw_weight: torch.Tensor,
    pw_bias: torch.Tensor | None,
    dilation: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward: ``(x * attn, d)``, ``d`` the two depthwise convs (kept for the backward)."""
    from visattn.kernels.triton.large_kernel_attention import large_kernel_attention_forward

    return large_kernel_attention_forward(
        x, dw_weight, dw_bias, dwd_weight, dwd_bias, pw_weight, pw_bias, dilation
    )


@_triton_fwd.register_fake
def _(x, dw_weight, dw_bias, dwd_weight, dwd_bias, pw_weight, pw_bias, dilation):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
        x, memory_format=torch.contiguous_format
    )


@torch.library.custom_op("visattn::large_kernel_attention_bwd", mutates_args=())
def _triton_bwd(
    grad_out: torch.Tensor,
    grad_d: torch.Tensor | None,
    x: torch.Tensor,
    d: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_bias: torch.Tensor | None,
    dwd_weight: torch.Tensor,
    dwd_bias: torch.Tensor | None,
    pw_weight: torch.Tensor,
    pw_bias: torch.Tensor | None,
    dilation: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward: gradients of x, dw weight/bias, dwd weight/bias, pw weight/bias (biases always)."""
    from visattn.kernels.triton.large_kernel_attention import large_kernel_attention_backward

    return large_kernel_attention_backward(
        grad_out, grad_d, x, d, dw_weight, dw_bias, dwd_weight, dwd_bias, pw_weight, pw_bias, dilation
    )


@_triton_bwd.register_fake
def _(grad_out, grad_d, x, d, dw_weight, dw_bias, dwd_weight, dwd_bias, pw_weight, pw_bias, dilation):
    channels = x.shape[1]
    bias = dw_weight.new_empty(channels)
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(dw_weight),
        bias,
        torch.empty_like(dwd_weight),
        torch.empty_like(bias),
        torch.empty_like(pw_weight),
        torch.empty_like(bias),
    )


def _setup_context(ctx, inputs, output):
    x, dw_weight, dw_bias, dwd_weight, dwd_bias, pw_weight, pw_bias, dilation = inputs
    ctx.save_for_backward(x, output[1], dw_weight, dw_bias, dwd_weight, dwd_bias, pw_weight, pw_bias)
    ctx.dilation = dilation


def _backward(ctx, grad_out, grad_d):
    x, d, dw_weight, dw_bias, dwd_weight, dwd_bias, pw_weight, pw_bias = ctx.saved_tensors
    g = _triton_bwd(
        grad_out, grad_d, x, d, dw_weight, dw_bias, dwd_weight, dwd_bias, pw_weight, pw_bias, ctx.dilation
    )
    g_x, g_w1, g_b1, g_w2, g_b2, g_pw, g_pwb = g
    return (
        g_x,
        g_w1,
        g_b1 if dw_bias is not None else None,
        g_w2,
        g_b2 if dwd_bias is not None else None,
        g_pw,
        g_pwb if pw_bias is not None else None,
        None,
    )


_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


def large_kernel_attention(
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_bias: torch.Tensor | None,
    dwd_weight: torch.Tensor,
    dwd_bias: torch.Tensor | None,
    pw_weight: torch.Tensor,
    pw_bias: torch.Tensor | None,
    dilation: int = 3,
    backend: str = "auto",
) -> torch.Tensor:
    """Large-kernel attention ``x * conv1x1(dwconv_dilated(dwconv(x)))`` (VAN's ``AttentionModule``).

    Args:
        x: ``[B, C, H, W]`` (channels-first).
        dw_weight, dw_bias: depthwise ``[C, 1, k1, k1]`` kernel (odd ``k1``; VAN: 5) and ``[C]`` bias or None;
            padding ``k1 // 2``.
        dwd_weight, dwd_bias: depthwise ``[C, 1, k2, k2]`` kernel (odd ``k2``; VAN: 7) and ``[C]`` bias
            or None, applied with ``dilation`` and padding ``dilation * (k2 // 2)``.
        pw_weight, pw_bias: 1x1 conv ``[C, C, 1, 1]`` and ``[C]`` bias or None.
        dilation: dilation of the second depthwise conv (VAN: 3).
        backend: ``"auto"`` (Triton on CUDA, ``"torch"`` elsewhere), ``"triton"``, ``"torch"`` or
            ``"reference"`` (both the ``F.conv2d`` chain: cuDNN / oneDNN convolutions are the fastest
            PyTorch path).

    Returns:
        ``[B, C, H, W]``, same dtype as ``x`` (under ``torch.autocast``: the autocast dtype, to which every
        argument is cast first, as autocast does for convolutions).
    """
    if isinstance(x, torch.Tensor) and x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
        # like the convolutions it replaces: everything in the autocast dtype (weights stay fp32 masters)
        dtype = torch.get_autocast_dtype(x.device.type)
        x, dw_weight, dw_bias, dwd_weight, dwd_bias, pw_weight, pw_bias = (
            t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for t in (x, dw_weight, dw_bias, dwd_weight, dwd_bias, pw_weight, pw_bias)
        )
    _check_args(x, dw_weight, dw_bias, dwd_weight, dwd_bias, pw_weight, pw_bias, dilation)
    tensors = [t for t in (x, dw_weight, dw_bias, dwd_weight, dwd_bias, pw_weight, pw_bias) if t is not None]
    if resolve_backend(backend, *tensors, op=OP, limit=triton_limit(x.dtype)) != "triton":
        return large_kernel_attention_reference(
            x, dw_weight, dw_bias, dwd_weight, dwd_bias, pw_weight, pw_bias, dilation
        )
    return _triton_fwd(x, dw_weight, dw_bias, dwd_weight, dwd_bias, pw_weight, pw_bias, dilation)[0]
