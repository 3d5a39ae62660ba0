"""SCOPE (Deng et al., "SCOPE: Saliency-Coverage Oriented Token Pruning for Efficient Multimodal LLMs",
NeurIPS 2025; official code kinredon/SCOPE, ``scope/clip_encoder.py``: ``CLIPVisionTower_SCOPE.forward``
and ``SCOPE``).

Before the projector, each image keeps ``keep`` patches picked greedily, inside the vision encoder's
second-to-last layer (official ``attentions[-2]`` / ``hidden_states[-2]``):

* coverage: with ``S`` the cosine similarity of the patch features and ``c_a`` the best similarity of
  patch ``a`` to the picked set (0 at first), a candidate's coverage gain is
  ``sum_a max(0, S_ac - c_a)`` over all patches ``a``;
* saliency: the candidate's [CLS] attention (heads summed in the official code; here averaged, a
  constant factor) raised to ``alpha`` (official ``ALPHA``, 1.0);
* each step picks the unpicked patch with the largest ``gain x saliency`` (first maximum on ties) and
  updates ``c``.

The kept patches keep their raster order; the LLM sees them with contiguous position ids. Official
budgets: 64 / 128 / 192 of LLaVA-1.5's 576 (README: ``scope(model, token_num=64)``).

Differences: the [CLS] row comes from :func:`visattn.kernels.attention_with_key_mass`, not from
``output_attentions``. LLaVA-NeXT: the official code splits the budget over the crops and lays the tiles'
kept patches out in stitched raster order without unpadding or newlines
(``restore_image_features_sorted_scope``); here every crop keeps ``keep`` (scaled to the patches of a
tile that reach the prompt) in its own slots, newlines kept. Towers without a [CLS] token (SigLIP, the
Qwen ViTs; the official code has no path for them) are refused at ``attach``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from visattn.mllm_tokens.cls_selection import ClsFeatureSelection
from visattn.mllm_tokens.fastv import keep_count


def scope_select(saliency: torch.Tensor, features: torch.Tensor, count: int, alpha: float) -> torch.Tensor:
    """SCOPE's greedy saliency x coverage selection.

    Args:
        saliency: ``[G, N]`` non-negative saliency of G images' tokens; features: ``[G, N, D]``.
        count: tokens picked per image (1..N); alpha: the saliency exponent.

    Returns:
        ``[G, count]`` long: the picked indices in pick order.
    """
    x = F.normalize(features.float(), dim=-1)
    similarity = x @ x.transpose(1, 2)  # [G, N, N], N = tokens of one image
    weight = saliency.float() ** alpha
    groups, n = saliency.shape
    rows = torch.arange(groups, device=saliency.device)
    covered = similarity.new_zeros(groups, n)  # best similarity of each token to the picked set
    taken = torch.zeros(groups, n, dtype=torch.bool, device=saliency.device)
    picks = []
    for _ in range(count):
        gains = (similarity - covered[:, :, None]).clamp_min(0).sum(1) * weight
        best = gains.masked_fill(taken, float("-inf")).argmax(1)
        picks.append(best)
        taken[rows, best] = True
        covered = torch.maximum(covered, similarity[rows, best])
    return torch.stack(picks, 1)


class SCOPE(ClsFeatureSelection):
    """Keep, per image, the ``keep`` patches picked greedily by coverage gain x [CLS] saliency.

    Args:
        keep: kept visual tokens per image: an int count (official 64 / 128 / 192 of 576) or a fraction.
        alpha: saliency exponent (official 1.0), a number >= 0.
    """

    def __init__(self, keep: int | float = 64, alpha: float = 1.0):
        keep_count(keep, 1 << 30, "SCOPE")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
            raise ValueError(f"SCOPE: alpha must be a number >= 0, got {alpha!r}")
        self.keep, self.alpha = keep, float(alpha)

    def __repr__(self) -> str:
        return f"SCOPE(keep={self.keep}, alpha={self.alpha})"

    def select(self, scores: torch.Tensor, features: torch.Tensor, count: int) -> torch.Tensor:
        return scope_select(scores, features, count, self.alpha)
