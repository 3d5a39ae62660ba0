"""VTC-CLS (Wang et al., "[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs",
arXiv 2412.05819; THU-MIG/VTC-CLS).

Visual tokens are ranked before the language model by the vision encoder's [CLS] attention: for
each ViT layer from ``start_layer`` up to the penultimate one (the official ``attentions[start:-1]``,
matching LLaVA's ``vision_feature_layer=-2``), the post-softmax attention of the [CLS] query to every
patch, averaged over heads, is summed over those layers. The top ``keep`` patches of each image are
kept in their original raster order; the LLM sees the shortened sequence with contiguous position
ids (the effective behaviour of the official LLaVA code). Official defaults: ``start_layer=16`` of
CLIP ViT-L/14-336's 24 layers (``--layer 16``); budgets 64 / 128 / 256 of 576 tokens.

Only the [CLS] query row of the scored layers is computed (through
:func:`visattn.kernels.attention_with_key_mass`), never ``output_attentions``. The official code
selects patch features before the projector; the projector acts per token, so selecting after it
(what the adapter does) gives the same features.
"""

from __future__ import annotations

import torch

from visattn.mllm_tokens._core import ModelInfo, Prefill, Reducer
from visattn.mllm_tokens.fastv import keep_budgets, keep_count, top_visual


class VTCCLS(Reducer):
    """Keep the ``keep`` patches per image with the highest summed [CLS] attention.

    Args:
        keep: kept visual tokens per image (int) or fraction in (0, 1]; an image with more or fewer
            tokens than ``ModelInfo.patches_per_image`` scales an int budget (:func:`keep_budgets`).
        start_layer: first ViT layer of the ensemble (official default 16); the ensemble ends at the
            penultimate layer. Negative values count from the end.
        reduce: how layers are combined: ``"sum"`` (official) or ``"max"`` / ``"min"`` (the official
            code's comment names them as alternatives).
    """

    def __init__(self, keep: int | float = 64, start_layer: int = 16, reduce: str = "sum"):
        if isinstance(start_layer, bool) or not isinstance(start_layer, int):
            raise ValueError(f"VTCCLS: start_layer must be an int, got {start_layer!r}")
        if reduce not in ("sum", "max", "min"):
            raise ValueError(f"VTCCLS: reduce must be 'sum', 'max' or 'min', got {reduce!r}")
        keep_count(keep, 1 << 30, "VTCCLS")
        self.keep, self.start_layer, self.reduce = keep, start_layer, reduce
        self._patches = 0

    def __repr__(self) -> str:
        return f"VTCCLS(keep={self.keep}, start_layer={self.start_layer}, reduce={self.reduce!r})"

    def _layers(self, info: ModelInfo) -> list[int]:
        start = self.start_layer + info.vision_layers if self.start_layer < 0 else self.start_layer
        if not 0 <= start <= info.vision_layers - 2:
            raise ValueError(
                f"VTCCLS: start_layer={self.start_layer} must select a layer before the last of the "
                f"{info.vision_layers}-layer vision encoder (0..{info.vision_layers - 2})"
            )
        return list(range(start, info.vision_layers - 1))

    def check(self, info: ModelInfo) -> None:
        self._layers(info)
        keep_count(self.keep, info.patches_per_image, "VTCCLS")
        self._patches = info.patches_per_image

    def vision_cls_layers(self, info: ModelInfo) -> list[int]:
        return self._layers(info)

    def pre_llm(self, state: Prefill) -> torch.Tensor | None:
        stacked = torch.stack(state.cls_scores)  # [layers, images, patches]
        if self.reduce == "sum":
            score = stacked.sum(0)
        else:
            score = stacked.amax(0) if self.reduce == "max" else stacked.amin(0)
        # rank only the patches that reached the prompt (anyres tiles lose padding rows to unpadding)
        present = torch.zeros_like(score, dtype=torch.bool)
        present[state.image_id[state.visual], state.patch_id[state.visual]] = True
        chosen = top_visual(score, present, keep_budgets(self.keep, state.image_tokens, self._patches))
        image = state.image_id.clamp_min(0)
        picked = chosen[image, state.patch_id.clamp_min(0)]
        return ~state.visual | (state.visual & picked)
