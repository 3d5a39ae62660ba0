"""Pooling: spatial average pooling of each image's visual tokens, the downsampling baseline (UniPruneBench,
TianfanPeng/VLMUniPruneBench ``methods/Pool_PreLLM.py``; VTC-Bench finds plain downsampling ahead of many
methods).

Before the language model, each image's LLM input embeddings (the projector's outputs, where the
official code pools InternVL's ``vit_embeds``) are laid out on the image's ``side x side`` patch grid and
averaged over non-overlapping ``kernel x kernel`` windows: a 24 x 24 LLaVA-1.5 image becomes 12 x 12 =
144 tokens with 2 x 2 windows, 8 x 8 = 64 with 3 x 3. Each window's mean takes the slot of the window's
first token in the prompt, so the pooled tokens keep the raster order of the windows, and the shortened
sequence gets contiguous positions (the official code writes the pooled tokens at the start of the
image span).

The budget is the window (``kernel=2``) or a token count per full view (``tokens=64``: the window that
divides the grid and gives the count nearest to it). A window that does not divide the grid is a
``ValueError``.

Differences: the official code pools with ``adaptive_avg_pool2d`` to a 2 x 2, 4 x 4 or 5 x 5 output
(its ``POOL_TARGET_TOKENS`` 4 / 16 / 25 for InternVL's 16 x 16 tiles), which for a dividing window is the
same average; uneven adaptive windows are not offered. LLaVA-NeXT: every crop is pooled on its own full
grid; a tile that lost rows or columns to unpadding averages each window over the tokens it still has
(a window with none left gives no token). Families whose reducer units have no ``side x side`` patch
grid (LLaVA-OneVision's shrunk anyres grids and pooled frames, Qwen2-VL's dynamic resolution) are
refused at ``attach``.
"""

from __future__ import annotations

import math

import torch

from visattn.mllm_tokens._core import ModelInfo, Prefill, Reducer


def pool_windows(
    unit: torch.Tensor, patch: torch.Tensor, side: int, kernel: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Window of every token and the first token of every window.

    Args:
        unit, patch: ``[N]`` long, each visual token's image and raster patch index in its
            ``side x side`` view (in prompt order).

    Returns:
        ``(window [N], first [N])``: a window id per token (ids are ``0..G-1``, G non-empty windows) and
        whether the token is its window's first one in prompt order.
    """
    cells = side // kernel
    key = (unit * cells + patch // side // kernel) * cells + patch % side // kernel
    uniq, window = key.unique(return_inverse=True)
    order = torch.arange(key.numel(), device=key.device)
    lead = torch.full((uniq.numel(),), key.numel(), device=key.device)
    lead = lead.scatter_reduce(0, window, order, "amin")
    return window, lead[window] == order


class Pooling(Reducer):
    """Replace every ``kernel x kernel`` window of each image's tokens by its average.

    Args:
        kernel: window side (1 keeps every token); must divide the patch grid's side.
        tokens: instead of ``kernel``, a token count per full view: the dividing window whose pooled
            grid is nearest to it (ties to the smaller window).
    """

    def __init__(self, kernel: int | None = 2, tokens: int | None = None):
        if tokens is not None:
            if kernel not in (None, 2):
                raise ValueError("Pooling: give either kernel= or tokens=, not both")
            kernel = None
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
                raise ValueError(f"Pooling: tokens must be an int >= 1, got {tokens!r}")
        elif isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1:
            raise ValueError(f"Pooling: kernel must be an int >= 1, got {kernel!r}")
        self.kernel, self.tokens = kernel, tokens
        self._side = 0

    def __repr__(self) -> str:
        return f"Pooling(tokens={self.tokens})" if self.kernel is None else f"Pooling(kernel={self.kernel})"

    def check(self, info: ModelInfo) -> None:
        side = math.isqrt(info.patches_per_image)
        if not info.patch_grid or info.patches_per_image == 0:
            raise ValueError(
                "Pooling: it averages windows of each image's square patch grid, and this model's reducer "
                "images have none (dynamic resolution, or anyres views and pooled frames in one unit)"
            )
        if self.kernel is None:
            if self.tokens > info.patches_per_image:
                raise ValueError(
                    f"Pooling: tokens={self.tokens} exceeds the {info.patches_per_image} visual tokens per "
                    "image"
                )
            kernels = [k for k in range(1, side + 1) if side % k == 0]
            self._kernel = min(kernels, key=lambda k: (abs((side // k) ** 2 - self.tokens), k))
        elif side % self.kernel:
            raise ValueError(
                f"Pooling: {self.kernel} x {self.kernel} windows do not divide the {side} x {side} patch "
                f"grid (dividing windows: {[k for k in range(1, side + 1) if side % k == 0]})"
            )
        else:
            self._kernel = self.kernel
        self._side = side

    def pre_llm(self, state: Prefill) -> torch.Tensor | None:
        visual = state.visual
        window, first = pool_windows(state.image_id[visual], state.patch_id[visual], self._side, self._kernel)
        tokens = state.embeds[visual].float()
        sums = tokens.new_zeros(int(window.max()) + 1, tokens.shape[1]).index_add_(0, window, tokens)
        counts = torch.bincount(window).to(tokens.dtype)[:, None]
        pooled = (sums / counts)[window].to(state.embeds.dtype)
        embeds = state.embeds.clone()
        embeds[visual] = torch.where(first[:, None], pooled, embeds[visual])
        state.embeds = embeds
        keep = ~visual
        keep[visual] = first
        return keep
