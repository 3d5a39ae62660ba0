"""HiPrune (Liu et al., "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision
Encoders", 2025; official code Danielement321/HiPrune, ``LLaVA/llava/model/llava_arch.py``,
``encode_images``).

Before the projector, each image keeps ``keep`` patches chosen from the vision encoder's *global*
attention (the attention each token receives, averaged over heads and all queries; no [CLS] query
needed) at two depths:

* anchors: the ``round(keep * alpha / 5)`` patches with the most global attention in the object layer
  (official ``attentions[HIPRUNE_OBJECT_LAYER - 1]``, layer 9 of CLIP ViT-L's 24, 1-based);
* buffers: the anchors' neighbours ``i - 1``, ``i + 1``, ``i - side``, ``i + side`` in the patch
  grid (indices clamped to the grid's ends as in the official code, so a row end reaches into the next
  row), anchors and buffers counted once;
* registers: the rest of the budget, the patches with the most global attention in the feature layer
  (official ``attentions[mm_vision_select_layer]``, -2) among those not yet chosen.

The kept patches keep their raster order; the LLM sees them with contiguous position ids. Official
defaults: ``alpha=0.1``, object layer 9, budgets 192 / 128 / 64 (``HIPRUNE_RETENTION``).

Differences: the global attention comes from :func:`visattn.kernels.attention_with_key_mass` (per-key
mass, never an N x N map), and registers exclude chosen patches by masking (the official code subtracts
1 from their attention, the same ranking). LLaVA-NeXT: the official budget is the image's
``HIPRUNE_RETENTION`` split evenly over its crops before unpadding; here ``keep`` is per crop (scaled to
the patches of a tile that reach the prompt, :func:`~visattn.mllm_tokens.fastv.keep_budgets`) and only
those patches are chosen. The feature layer is the vision tower's second-to-last, as in the official
LLaVA settings. LLaVA-OneVision (its units mix a base view and shrunk tiles) and the Qwen ViTs
(packed windows, the official ``qwen2_5_vl_HiPrune.py`` path) are refused at ``attach``.
"""

from __future__ import annotations

import math

import torch

from visattn.mllm_tokens._core import ModelInfo, Prefill, Reducer
from visattn.mllm_tokens.fastv import keep_budgets, keep_count


def hiprune_select(
    shallow: torch.Tensor, deep: torch.Tensor, present: torch.Tensor, count: int, alpha: float, side: int
) -> torch.Tensor:
    """HiPrune's choice for one view of ``P = side * side`` patches.

    Args:
        shallow / deep: ``[P]`` global attention of each patch in the object / feature layer.
        present: ``[P]`` bool, the patches that may be chosen; count: patches to keep (<= present ones).

    Returns:
        ``[P]`` bool: the kept patches.
    """
    patches = shallow.shape[0]
    anchors = shallow.float().masked_fill(~present, float("-inf")).topk(round(count * alpha / 5)).indices
    near = torch.cat([anchors, anchors - 1, anchors + 1, anchors - side, anchors + side]).clamp(
        0, patches - 1
    )
    chosen = torch.zeros_like(present)
    chosen[near] = True
    chosen &= present
    registers = count - int(chosen.sum())
    if registers < 0:
        raise ValueError(
            f"HiPrune: the anchors and buffers ({int(chosen.sum())}) exceed the budget of {count}; "
            "lower alpha"
        )
    rest = deep.float().masked_fill(chosen | ~present, float("-inf"))
    chosen[rest.topk(registers).indices] = True
    return chosen


class HiPrune(Reducer):
    """Keep, per image, anchor + buffer patches of a middle vision layer and register patches of a deep one.

    Args:
        keep: kept visual tokens per image (an int count, official 192 / 128 / 64 of 576) or a fraction.
        alpha: anchors are ``round(keep * alpha / 5)`` (official 0.1), in [0, 1].
        object_layer: the vision layer of the anchors, 1-based (official 9 of 24); negative counts from
            the end.
    """

    def __init__(self, keep: int | float = 192, alpha: float = 0.1, object_layer: int = 9):
        keep_count(keep, 1 << 30, "HiPrune")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"HiPrune: alpha must be a number in [0, 1], got {alpha!r}")
        if isinstance(object_layer, bool) or not isinstance(object_layer, int) or object_layer == 0:
            raise ValueError(f"HiPrune: object_layer must be a nonzero int (1-based), got {object_layer!r}")
        self.keep, self.alpha, self.object_layer = keep, float(alpha), object_layer
        self._patches, self._scored = 0, (0, 0)

    def __repr__(self) -> str:
        return f"HiPrune(keep={self.keep}, alpha={self.alpha}, object_layer={self.object_layer})"

    def _layers(self, info: ModelInfo) -> tuple[int, int]:
        """``(object, feature)`` 0-based vision layers."""
        shallow = self.object_layer - 1 if self.object_layer > 0 else info.vision_layers + self.object_layer
        if not 0 <= shallow < info.vision_layers or info.vision_layers < 2:
            raise ValueError(
                f"HiPrune: object_layer={self.object_layer} is not a layer of the {info.vision_layers}-layer "
                f"vision encoder (1..{info.vision_layers}, 1-based)"
            )
        return shallow, info.vision_layers - 2

    def check(self, info: ModelInfo) -> None:
        keep_count(self.keep, info.patches_per_image or 1 << 30, "HiPrune")
        self._scored = self._layers(info)
        self._patches = info.patches_per_image

    def vision_global_layers(self, info: ModelInfo) -> list[int]:
        return sorted(set(self._layers(info)))

    def pre_llm(self, state: Prefill) -> torch.Tensor | None:
        shallow_layer, deep_layer = self._scored
        shallow, deep = state.global_scores[shallow_layer][:, 1:], state.global_scores[deep_layer][:, 1:]
        units, patches = shallow.shape
        side = math.isqrt(patches)
        if side * side != patches:
            raise ValueError(f"HiPrune: a view of {patches} patches is not a square grid")
        budgets = keep_budgets(self.keep, state.image_tokens, self._patches).tolist()
        keep = ~state.visual
        for unit in range(units):
            slots = (state.image_id == unit) & state.visual  # [B, L]
            if not budgets[unit]:
                continue
            patch = state.patch_id[slots]
            present = torch.zeros(patches, dtype=torch.bool, device=patch.device)
            present[patch] = True
            chosen = hiprune_select(shallow[unit], deep[unit], present, budgets[unit], self.alpha, side)
            keep[slots] = chosen[patch]
        return keep
