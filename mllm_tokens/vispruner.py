"""VisPruner (Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token
Pruning in VLMs", ICCV 2025; official code Theia-4869/VisPruner, ``llava/model/llava_arch.py``,
``encode_images``, and ``multimodal_encoder/clip_encoder.py``).

Before the projector, each image keeps ``keep`` of its patches in two parts:

* important: the ``int(keep * important_ratio)`` patches with the most [CLS] attention in the vision
  layer the features come from (official ``attentions[select_layer]``, ``select_layer = -2``: the
  second-to-last layer; the [CLS] query row over the patches, mean over heads);
* diverse: the other patches, in descending [CLS] attention, are thinned until ``keep`` remain: each
  round splits the list into even and odd positions, scores every even one by its highest cosine
  similarity (vision features of that layer) to any odd one, drops the ``min(8, surplus)`` highest
  and puts the surviving even ones (in descending score) before the odd ones.

The kept patches keep their raster order; the shortened sequence gets contiguous position ids (the
official code drops the other tokens). Official defaults: ``important_ratio=0.5``; budgets 64 / 128 /
192 of LLaVA-1.5's 576 (``--visual_token_num``).

Differences: the attention ranking is a stable sort (the official ``argsort`` leaves ties in any
order); the thinning handles an odd-length list (the official indexing assumes an even one, which its
budgets always give). The [CLS] row comes from :func:`visattn.kernels.attention_with_key_mass`, not
from ``output_attentions``. LLaVA-NeXT: each crop is pruned on its own, as in the official code, but
among the patches that reach the prompt (tiles lose rows to unpadding), with its budget scaled to them
(:func:`~visattn.mllm_tokens.fastv.keep_budgets`). Towers without a [CLS] token (LLaVA-OneVision's
SigLIP, the Qwen2-VL ViT) are refused at ``attach``: the official SigLIP / Qwen paths rank by global
attention (the mean attention each patch receives; on Qwen merged like the patch merger, VisPruner
issue #1), which the adapters do not yet record.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from visattn.mllm_tokens.cls_selection import ClsFeatureSelection
from visattn.mllm_tokens.fastv import keep_count


def vispruner_select(
    scores: torch.Tensor, features: torch.Tensor, important: int, diverse: int
) -> torch.Tensor:
    """VisPruner's selection.

    Args:
        scores: ``[G, N]`` attention of each of G images' tokens (higher: more important).
        features: ``[G, N, D]`` the tokens' features (cosine similarity for the duplicate removal).
        important / diverse: tokens kept by attention / by the duplicate removal.

    Returns:
        ``[G, important + diverse]`` long: the kept indices (important first, unsorted).
    """
    order = scores.float().argsort(dim=1, descending=True, stable=True)
    kept, residual = order[:, :important], order[:, important:]
    x = F.normalize(features.float(), dim=-1)
    while diverse > 0:
        r = min(8, residual.shape[1] - diverse)
        if r <= 0:
            break
        tokens = x.gather(1, residual[..., None].expand(-1, -1, x.shape[-1]))
        similarity = (tokens[:, ::2] @ tokens[:, 1::2].transpose(1, 2)).amax(-1)  # [G, ceil(R / 2)]
        distinct = similarity.argsort(dim=1, descending=True, stable=True)[:, r:]
        residual = torch.cat([residual[:, ::2].gather(1, distinct), residual[:, 1::2]], dim=1)
    return torch.cat([kept, residual], dim=1) if diverse > 0 else kept


class VisPruner(ClsFeatureSelection):
    """Keep, per image, ``keep`` patches: the most [CLS]-attended ones and a diverse rest.

    Args:
        keep: kept visual tokens per image: an int count (official 64 / 128 / 192 of 576) or a
            fraction in (0, 1] of the image's tokens.
        important_ratio: the share of ``keep`` chosen by [CLS] attention (official 0.5), in [0, 1].
    """

    def __init__(self, keep: int | float = 64, important_ratio: float = 0.5):
        keep_count(keep, 1 << 30, "VisPruner")
        if isinstance(important_ratio, bool) or not isinstance(important_ratio, (int, float)):
            raise ValueError(
                f"VisPruner: important_ratio must be a number in [0, 1], got {important_ratio!r}"
            )
        if not 0.0 <= important_ratio <= 1.0:
            raise ValueError(f"VisPruner: important_ratio must be in [0, 1], got {important_ratio}")
        self.keep, self.important_ratio = keep, float(important_ratio)

    def __repr__(self) -> str:
        return f"VisPruner(keep={self.keep}, important_ratio={self.important_ratio})"

    def select(self, scores: torch.Tensor, features: torch.Tensor, count: int) -> torch.Tensor:
        important = int(count * self.important_ratio)
        return vispruner_select(scores, features, important, count - important)
