"""VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
CVPR 2025; official code dvlab-research/VisionZip, ``visionzip/clip_encoder.py``), training-free mode.

Before the projector, each image's vision features (the LLM's feature layer, [CLS] included) shrink to
``dominant + contextual`` tokens:

* dominant: the [CLS] token and the ``dominant - 1`` patches with the most [CLS] attention in the
  vision encoder's second-to-last layer (official ``attentions[-2]``; heads summed, softmax over all
  keys), in their original order, [CLS] first;
* contextual: the other tokens, in order, are compared by that layer's keys averaged over heads
  (cosine); ``contextual`` targets are taken at a uniform stride (``step = max(1, n // contextual)``),
  every other token joins its most similar target, and each contextual token is the target's feature
  **plus** the mean of the features that joined it (a target nobody joined stays as it is).

The projector maps the ``dominant + contextual`` tokens and the LLM sees them in place of the image's
patches, with contiguous position ids.

LLaVA-NeXT (official ``llava_arch.py``, ``prepare_inputs_labels_for_multimodal_visionzip`` and
``restore_image_features_sorted``): every crop (the base view and each tile) goes through VisionZip on
its own with the same ``dominant`` / ``contextual`` (the budget is per crop, not split across crops),
and an image's tokens are, in order: the base view's ``dominant + contextual`` tokens; the tiles'
dominant patches put back on the stitched tile grid and read in raster order, without unpadding (a
patch of a tile's padding may be kept) and without newline tokens; the tiles' [CLS] tokens; the tiles'
contextual tokens, tile by tile (:func:`anyres_order`). The image's first visual slots of the prompt
take them, its other slots (row-end newlines included) are dropped; an image whose prompt has fewer
visual slots than ``crops x (dominant + contextual)`` is refused with a ``ValueError``.

Budgets: the README's 64 = 54 + 10, and 128 = 108 + 20, 192 = 162 + 30 (the splits used in the
paper's tables) as presets (``tokens=``); any split by ``dominant`` / ``contextual``.

Differences: the official ``visionzip(model, dominant=191, contextual=30)`` subtracts one from
``dominant`` for the [CLS] token, as here (``dominant`` counts [CLS]). The [CLS] row is scored through
:func:`visattn.kernels.attention_with_key_mass` (mean over heads: the same ranking as the sum); the
official code asks the encoder for all attention maps. The official code runs the whole batch of
images at once; so does this one, per image. The official NeXT code hard-codes a 24 x 24 patch grid
(576 patches, CLIP-L/14 at 336 px); here the grid side is the square root of the tower's patches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from visattn.mllm_tokens._core import ModelInfo, Prefill, Reducer, check_budget

PRESETS = {64: (54, 10), 128: (108, 20), 192: (162, 30)}  # tokens -> (dominant, contextual)


def visionzip_tokens(
    hidden: torch.Tensor, cls_scores: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's token selection and merging.

    Args:
        hidden: ``[I, 1 + P, Dv]`` vision features, [CLS] first.
        cls_scores: ``[I, P]`` [CLS] attention to every patch.
        keys: ``[I, 1 + P, Dk]`` keys averaged over heads (the similarity metric).
        dominant: kept tokens including [CLS]; contextual: merged tokens.

    Returns:
        ``[I, dominant + contextual, Dv]``: the dominant tokens in order ([CLS] first), then the
        contextual tokens; and ``[I, dominant - 1]`` the patch index (0..P-1) of each dominant patch.
    """
    images, n, dim = hidden.shape
    top = cls_scores.topk(dominant - 1, dim=1).indices + 1
    keep = torch.zeros(images, n, dtype=torch.bool, device=hidden.device)
    keep[:, 0] = True
    keep.scatter_(1, top, True)
    dominant_tokens = hidden[keep].view(images, dominant, dim)
    patches = top.sort(dim=1).values - 1
    if contextual == 0:
        return dominant_tokens, patches
    rest = hidden[~keep].view(images, n - dominant, dim)
    metric = F.normalize(keys[~keep].view(images, n - dominant, -1).float(), dim=-1)
    step = max(1, rest.shape[1] // contextual)
    targets = torch.zeros(rest.shape[1], dtype=torch.bool, device=hidden.device)
    targets[torch.arange(0, rest.shape[1], step, device=hidden.device)[:contextual]] = True
    similarity = metric[:, ~targets] @ metric[:, targets].transpose(1, 2)  # [I, others, contextual]
    assign = F.one_hot(similarity.argmax(2), contextual).to(rest.dtype)
    counts = assign.sum(1).clamp_min(1)[..., None]
    merged = rest[:, targets] + assign.transpose(1, 2) @ rest[:, ~targets] / counts
    return torch.cat([dominant_tokens, merged], dim=1), patches


def anyres_order(
    tokens: torch.Tensor, patches: torch.Tensor, grid: tuple[int, int], side: int
) -> torch.Tensor:
    """One anyres image's VisionZip tokens in the official LLaVA-NeXT order
    (``restore_image_features_sorted``): the base view's ``dominant + contextual`` tokens as they are;
    the tiles' dominant patches in raster order of the stitched ``rows x columns`` tile grid (no
    unpadding, no newline tokens); the tiles' [CLS] tokens; the tiles' contextual tokens, tile by tile.

    Args:
        tokens: ``[1 + tiles, dominant + contextual, D]``, the base view first, tiles row by row.
        patches: ``[1 + tiles, dominant - 1]`` the dominant patches' indices in their ``side x side`` view.
        grid: ``(rows, columns)`` of the tiles.

    Returns:
        ``[(1 + tiles) * (dominant + contextual), D]``.
    """
    rows, cols = grid
    tiles, tile_patches = tokens[1:], patches[1:]
    dominant = tile_patches.shape[1] + 1
    if tiles.shape[0] != rows * cols:
        raise ValueError(f"VisionZip: an anyres image has {tiles.shape[0]} tiles, not {rows} x {cols}")
    tile = torch.arange(tiles.shape[0], device=patches.device)[:, None]
    row = (tile // cols) * side + tile_patches // side  # in the stitched grid
    col = (tile % cols) * side + tile_patches % side
    order = (row * cols * side + col).flatten().argsort()
    stitched = tiles[:, 1:dominant].flatten(0, 1)[order]
    return torch.cat([tokens[0], stitched, tiles[:, 0], tiles[:, dominant:].flatten(0, 1)])


class VisionZip(Reducer):
    """Replace each image's tokens by ``dominant`` [CLS]-ranked tokens plus ``contextual`` merged ones.

    Args:
        tokens: a preset budget per image: 64 (54 + 10, the README's), 128 (108 + 20) or 192 (162 + 30).
        dominant / contextual: an explicit split instead of ``tokens`` (``dominant`` counts [CLS]).
    """

    needs_vision_features = True

    def __init__(self, tokens: int | None = 64, dominant: int | None = None, contextual: int | None = None):
        if dominant is not None or contextual is not None:
            if tokens not in (None, 64) or dominant is None or contextual is None:
                raise ValueError(
                    "VisionZip: give either tokens= (a preset) or both dominant= and contextual="
                )
            for name, value, low in (("dominant", dominant, 1), ("contextual", contextual, 0)):
                if isinstance(value, bool) or not isinstance(value, int) or value < low:
                    raise ValueError(f"VisionZip: {name} must be an int >= {low}, got {value!r}")
        elif tokens not in PRESETS:
            raise ValueError(
                f"VisionZip: tokens must be one of the presets {sorted(PRESETS)}, got {tokens!r} "
                "(pass dominant= and contextual= for another split)"
            )
        else:
            dominant, contextual = PRESETS[tokens]
        self.dominant, self.contextual = dominant, contextual

    def __repr__(self) -> str:
        return f"VisionZip(dominant={self.dominant}, contextual={self.contextual})"

    def check(self, info: ModelInfo) -> None:
        if info.patches_per_image == 0:
            raise ValueError(
                "VisionZip: it ranks each image's patches by the vision tower's [CLS] attention and needs a "
                "common token count per image; this model's vision tower has neither (dynamic resolution)"
            )
        budget = f"dominant={self.dominant} + contextual={self.contextual}"
        check_budget("VisionZip", budget, self.dominant + self.contextual, info.patches_per_image)
        if info.vision_layers < 2:
            raise ValueError(
                "VisionZip: the vision encoder needs at least 2 layers (it scores the second-to-last)"
            )

    def vision_cls_layers(self, info: ModelInfo) -> list[int]:
        return [info.vision_layers - 2]

    def pre_llm(self, state: Prefill) -> torch.Tensor | None:
        hidden = state.vision_hidden
        if hidden is None or hidden.shape[1] != state.cls_scores[0].shape[1] + 1:
            raise ValueError(
                "VisionZip: the vision features must be one [CLS] token plus one token per patch "
                "(vision_feature_select_strategy='default' on a ViT with a [CLS] token)"
            )
        tokens, patches = visionzip_tokens(
            hidden, state.cls_scores[0], state.cls_keys[0], self.dominant, self.contextual
        )
        projected = state.ops.project_image_features(tokens).to(state.embeds.dtype)
        side = math.isqrt(state.cls_scores[0].shape[1])  # a square grid of patches per view
        embeds, keep = state.embeds.clone(), torch.ones_like(state.visual)
        for image in state.ops.prompt_images(state):
            units = projected[image.units]
            if image.grid is None:
                sequence = units.flatten(0, 1)
            else:
                sequence = anyres_order(units, patches[image.units], image.grid, side)
            # the image's first visual slots take its tokens, in order; its other slots (newlines too) go
            slots = image.slots[state.visual[image.sample, image.slots]]
            if sequence.shape[0] > slots.numel():
                raise ValueError(
                    f"VisionZip: an image of {slots.numel()} visual tokens in the prompt cannot take its "
                    f"{sequence.shape[0]} VisionZip tokens ({len(image.units)} views x "
                    f"{self.dominant + self.contextual}); lower dominant / contextual"
                )
            keep[image.sample, image.slots] = False
            keep[image.sample, slots[: sequence.shape[0]]] = True
            embeds[image.sample, slots[: sequence.shape[0]]] = sequence
        state.embeds = embeds
        return keep
