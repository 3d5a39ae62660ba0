"""DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models",
CVPR 2025; official code vbdi/divprune, ``LLaVA/llava/model/llava_arch.py``).

Before the language model, each image keeps the subset of its visual tokens that solves the max-min
diversity problem greedily: on the projector outputs (the LLM input embeddings of the image tokens),
with distance ``1 - cosine similarity``,

* the first pick is the token whose nearest other token is farthest (largest second-smallest entry of
  its distance column; the smallest is the token itself);
* every next pick is the token whose minimum distance to the picked set is largest;
* ties go to the lowest index (``argmax``), as in the official code.

The picked tokens keep their raster order and the shortened sequence gets contiguous position ids
(the official code drops the other tokens from the input embeddings). Official budget: a ratio of the
visual tokens, ``round(0.098 * 576) = 56`` for LLaVA-1.5 (``SUBSET_RATIO``; the README's FLOPs script
uses 0.098).

Differences: the official code hard-codes the image span of sample 0 (system prompt of 35 tokens) and
runs batch 1; here every image of every sample is selected on its own. The official loop does not
exclude picked tokens from later picks (their distance to themselves, ~0, makes a repeat unlikely but
possible with exact duplicates); here a picked token is never picked again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from visattn.mllm_tokens._core import ModelInfo, Prefill, Reducer
from visattn.mllm_tokens.fastv import keep_budgets, keep_count


def max_min_diverse(features: torch.Tensor, count: int) -> torch.Tensor:
    """Greedy max-min diversity selection.

    Args:
        features: ``[G, N, D]``, G independent sets of N vectors.
        count: vectors picked per set (1..N).

    Returns:
        ``[G, count]`` long: the picked indices in pick order.
    """
    x = F.normalize(features.float(), dim=-1)
    dist = 1.0 - x @ x.transpose(1, 2)  # [G, N, N], N = visual tokens of one image
    groups, n = dist.shape[:2]
    rows = torch.arange(groups, device=dist.device)
    # first pick: the token whose nearest other token is farthest (the smallest entry is its own ~0)
    first = dist.topk(2, dim=1, largest=False).values[:, 1].argmax(1)
    picks = [first]
    nearest = dist[rows, first]  # [G, N] distance to the picked set
    taken = torch.zeros(groups, n, dtype=torch.bool, device=dist.device)
    taken[rows, first] = True
    for _ in range(count - 1):
        nxt = nearest.masked_fill(taken, float("-inf")).argmax(1)
        picks.append(nxt)
        taken[rows, nxt] = True
        nearest = torch.minimum(nearest, dist[rows, nxt])
    return torch.stack(picks, 1)


def image_groups(state: Prefill, budgets: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """The images of a prefill grouped for batched per-image selection.

    Args:
        state: the prefill; its visual tokens ``state.embeds[state.visual]`` are numbered ``0..Nv-1``
            in (sample, position) order.
        budgets: ``[images]`` tokens to keep per image.

    Returns:
        ``(slots [G, n], count)`` per group of images with ``n`` tokens and budget ``count`` each:
        ``slots`` indexes the ``Nv`` visual tokens, one row per image, in the image's token order.
    """
    image = state.image_id[state.visual]
    order = image.argsort(stable=True)  # token slots grouped by image (anyres tiles interleave)
    starts = (state.image_tokens.cumsum(0) - state.image_tokens).tolist()
    by_shape: dict[tuple[int, int], list[int]] = {}
    for img, (n, count) in enumerate(zip(state.image_tokens.tolist(), budgets.tolist())):
        if n:
            by_shape.setdefault((n, count), []).append(img)
    return [
        (torch.stack([order[starts[i] : starts[i] + n] for i in images]), count)
        for (n, count), images in by_shape.items()
    ]


class DivPrune(Reducer):
    """Keep, per image, the ``keep`` most diverse visual tokens (greedy max-min, cosine distance).

    Args:
        keep: kept visual tokens per image: an int count or a fraction in (0, 1] of the image's tokens
            (official ``SUBSET_RATIO``; default 0.098, i.e. 56 of LLaVA-1.5's 576).
    """

    def __init__(self, keep: int | float = 0.098):
        keep_count(keep, 1 << 30, "DivPrune")
        self.keep = keep
        self._patches = 0

    def __repr__(self) -> str:
        return f"DivPrune(keep={self.keep})"

    def check(self, info: ModelInfo) -> None:
        keep_count(self.keep, info.patches_per_image or 1 << 30, "DivPrune")
        self._patches = info.patches_per_image

    def pre_llm(self, state: Prefill) -> torch.Tensor | None:
        features = state.embeds[state.visual]  # [Nv, D], the visual tokens in (sample, position) order
        budgets = keep_budgets(self.keep, state.image_tokens, self._patches)
        chosen = torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)
        for slots, count in image_groups(state, budgets):
            picks = max_min_diverse(features[slots], count)
            chosen[slots.gather(1, picks).flatten()] = True
        keep = ~state.visual
        keep[state.visual] = chosen
        return keep
