"""The shared frame of reducers that pick each image's patches before the projector from the vision
tower's second-to-last layer: its [CLS] attention row and its patch features (VisPruner, SCOPE).

A subclass sets ``keep`` and implements :meth:`ClsFeatureSelection.select`; the frame checks the budget
and the tower, asks the adapter for that layer's [CLS] row and features, and turns each image's picks
into the prefill's keep mask.
"""

from __future__ import annotations

import torch

from visattn.mllm_tokens._core import ModelInfo, Prefill, Reducer
from visattn.mllm_tokens.divprune import image_groups
from visattn.mllm_tokens.fastv import keep_budgets, keep_count


class ClsFeatureSelection(Reducer):
    """Per image, ``count`` patches chosen by :meth:`select` from [CLS] scores and features of vision layer
    ``-2``; ``keep`` is an int count per image or a fraction of the image's tokens."""

    needs_vision_features = True
    keep: int | float
    _patches = 0

    def select(self, scores: torch.Tensor, features: torch.Tensor, count: int) -> torch.Tensor:
        """``[G, count]`` long: the kept indices of G images' ``[G, N]`` [CLS] scores and ``[G, N, Dv]``
        patch features."""
        raise NotImplementedError

    def check(self, info: ModelInfo) -> None:
        name = type(self).__name__
        keep_count(self.keep, info.patches_per_image or 1 << 30, name)
        if info.vision_layers < 2:
            raise ValueError(
                f"{name}: the vision encoder needs at least 2 layers (it scores the second-to-last)"
            )
        self._patches = info.patches_per_image

    def vision_cls_layers(self, info: ModelInfo) -> list[int]:
        return [info.vision_layers - 2]

    def pre_llm(self, state: Prefill) -> torch.Tensor | None:
        hidden, scores = state.vision_hidden, state.cls_scores[0]  # [units, 1 + P, Dv], [units, P]
        if hidden is None or hidden.shape[1] != scores.shape[1] + 1:
            raise ValueError(
                f"{type(self).__name__}: the vision features must be one [CLS] token plus one token "
                "per patch "
                "(vision_feature_select_strategy='default' on a ViT with a [CLS] token)"
            )
        unit, patch = state.image_id[state.visual], state.patch_id[state.visual]  # [Nv] each
        budgets = keep_budgets(self.keep, state.image_tokens, self._patches)
        chosen = torch.zeros(unit.shape[0], dtype=torch.bool, device=unit.device)
        for slots, count in image_groups(state, budgets):
            u, p = unit[slots], patch[slots]  # [G, n]
            picks = self.select(scores[u, p], hidden[u, p + 1], count)
            chosen[slots.gather(1, picks).flatten()] = True
        keep = ~state.visual
        keep[state.visual] = chosen
        return keep
