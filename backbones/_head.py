"""Classifier-head application shared by the channels-first (NCHW) backbones."""

from __future__ import annotations

import torch
from torch import nn


def apply_head(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``head`` (a Linear or Identity over channels) on pooled ``[B, C]`` features, or, with pooling
    disabled (``global_pool=''``), on every location of ``[B, C, H, W]`` -> ``[B, num_classes, H, W]``,
    as timm's convolutional heads do; the weights stay those of the Linear, so checkpoints still load."""
    return head(x) if x.ndim == 2 else head(x.movedim(1, -1)).movedim(-1, 1)
