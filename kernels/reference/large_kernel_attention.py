"""Readable PyTorch reference of large-kernel attention (LKA, Guo et al., "Visual Attention Network").

This is the ground truth the Triton kernels are tested against, written the way the
official VAN code computes it: three ``torch.nn.functional.conv2d`` calls and a product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def large_kernel_attention_reference(
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_bias: torch.Tensor | None,
    dwd_weight: torch.Tensor,
    dwd_bias: torch.Tensor | None,
    pw_weight: torch.Tensor,
    pw_bias: torch.Tensor | None,
    dilation: int = 3,
) -> torch.Tensor:
    """``x * conv1x1(dwconv_dilated(dwconv(x)))`` on channels-first ``x`` of shape ``[B, C, H, W]``.

    ``dw_weight`` ``[C, 1, k1, k1]`` (depthwise, padding ``k1 // 2``), ``dwd_weight`` ``[C, 1, k2, k2]``
    (depthwise, ``dilation``, padding ``dilation * (k2 // 2)``), ``pw_weight`` ``[C, C, 1, 1]``;
    biases ``[C]`` or None.
    Returns ``[B, C, H, W]``.
    """
    channels = x.shape[1]
    attn = F.conv2d(x, dw_weight, dw_bias, padding=dw_weight.shape[-1] // 2, groups=channels)
    attn = F.conv2d(
        attn,
        dwd_weight,
        dwd_bias,
        padding=dilation * (dwd_weight.shape[-1] // 2),
        dilation=dilation,
        groups=channels,
    )
    attn = F.conv2d(attn, pw_weight, pw_bias)
    return x * attn
