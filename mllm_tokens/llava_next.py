"""Adapter for transformers ``LlavaNextForConditionalGeneration`` (LLaVA-NeXT / LLaVA-1.6: "anyres" images,
a CLIP vision tower, a LLaMA-family language model).

Each image is encoded as a base view plus a grid of tiles ("crops", each one CLIP image); the tiles'
features are stitched into one grid, padding rows or columns are cut off (``unpad_image``) and an
``image_newline`` embedding ends every row. So an image has a different number of tokens depending on
its size, and some of its ``<image>`` tokens are newline tokens.

For the reducers an *image* is one crop, the unit the vision tower encodes and the one [CLS] row
belongs to: the base view has ``(image_size / patch_size)^2`` tokens (``ModelInfo.patches_per_image``),
a tile that lost rows to unpadding has fewer. Newline tokens are not visual: no reducer removes or
counts them. An ``int`` keep is per full crop and scales with a crop's tokens (``keep * n / patches``,
see :func:`~visattn.mllm_tokens.fastv.keep_budgets`); a fraction is a fraction of every crop. VTC-CLS
ranks each crop's patches by that crop's own [CLS] attention (every crop went through CLIP with its
[CLS] token); only the patches that reached the prompt compete. VisionZip rewrites whole images in the
official anyres order (see :mod:`~visattn.mllm_tokens.visionzip`): the adapter lends it each prompt
image's slots, crops and tile grid (:meth:`LlavaNextAdapter.prompt_images`) and the vision features at
``vision_feature_layer``.

Which token comes from which crop and patch is recomputed with transformers' own
``LlavaNextModel.pack_image_features`` applied to patch indices instead of features (so unpadding and
newline placement are exactly the model's), from the ``image_sizes`` of the last
``get_image_features`` call. generate() calls that method before the prefill and passes the features,
not ``image_sizes``, to the forward (transformers >= 5.24), so the adapter records the call's
arguments with an instance-level wrapper around ``get_image_features`` (removed by ``remove()``).

What it touches in transformers: the wrapper above, forward pre-hooks on the outer model (labels
check), ``LlavaNextModel`` (``input_ids``), the vision tower (start of a vision pass) and the language
model and its decoder layers (see :mod:`visattn.mllm_tokens._adapter`); the attention of the text
config (and of the vision config when [CLS] rows are scored) is routed through visattn's
``AttentionInterface`` function for the layers a reducer needs.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
from torch import nn

from visattn.mllm_tokens._adapter import Adapter
from visattn.mllm_tokens._core import Prefill, PromptImage, Reducer
from visattn.mllm_tokens.llava import check_feature_layer, clip_attentions, feature_layer_output, llava_info


def is_supported(model: nn.Module) -> bool:
    """True for a transformers ``LlavaNextForConditionalGeneration``."""
    try:
        from transformers import LlavaNextForConditionalGeneration
    except ImportError:
        return False
    return isinstance(model, LlavaNextForConditionalGeneration)


def record_calls(module: nn.Module, name: str, record: Callable[[dict], None]) -> Callable[[], None]:
    """Call ``record(arguments)`` (the bound arguments by name) on every call of ``module.<name>``.

    An instance attribute shadows the class's method until the returned undo removes it again.
    """
    method = getattr(module, name)
    signature = inspect.signature(method)

    @functools.wraps(method)
    def recording(*args, **kwargs):
        record(signature.bind(*args, **kwargs).arguments)
        return method(*args, **kwargs)

    setattr(module, name, recording)
    return lambda: module.__dict__.pop(name, None)


def assign_images(lengths: list[int], row_tokens: list[int]) -> list[list[int]]:
    """The images (indices into ``lengths``, tokens per image) of each row, in prompt order.

    Images fill the rows' image tokens (``row_tokens``) in order, as ``masked_scatter`` places them.
    When the rows hold ``n`` times the encoded tokens, generate(num_beams / num_return_sequences) has
    repeated each sample ``n`` times after encoding its images once: every copy gets the images.
    """
    total, wanted = sum(lengths), sum(row_tokens)
    repeat = wanted // total if total else 0
    if repeat < 1 or wanted != repeat * total or len(row_tokens) % repeat:
        raise ValueError(f"attach: the prompt has {wanted} image tokens but the images give {total}")
    rows, next_image = [], 0
    for want in row_tokens[::repeat]:
        group, have = [], 0
        while have < want and next_image < len(lengths):
            group.append(next_image)
            have += lengths[next_image]
            next_image += 1
        rows += [group] * repeat
    if next_image != len(lengths) or any(
        sum(lengths[i] for i in group) != want for group, want in zip(rows, row_tokens)
    ):
        raise ValueError(f"attach: the images' token counts {lengths} do not fill the rows {row_tokens}")
    return rows


def place_units(
    parts: list[tuple[torch.Tensor, list[torch.Tensor], list[int]]], shape: torch.Size, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(image_id, patch_id, images_per_sample)`` of the reducers' *units* (an anyres crop, a whole
    image, a video frame), numbered sample after sample.

    ``parts``: per modality ``(mask [B, L], layouts, units)``: the token positions of that modality,
    then per item (image or video, in the order the model scatters them) a ``[n, 2]`` long tensor
    ``(unit inside the item, patch)`` of its tokens (``(-1, -1)`` for a newline), and its unit count.
    A sample's units are those of its first part's items, then of the next part's.
    """
    rows = [assign_images([len(t) for t in layouts], mask.sum(1).tolist()) for mask, layouts, _ in parts]
    counts = [
        [sum(units[i] for i in row) for row in part_rows] for part_rows, (_, _, units) in zip(rows, parts)
    ]
    per_sample = torch.tensor([sum(c) for c in zip(*counts)], dtype=torch.long)
    first = (per_sample.cumsum(0) - per_sample).tolist()
    image_id = torch.full(shape, -1, dtype=torch.long)
    patch_id = image_id.clone()
    for p, (mask, layouts, units) in enumerate(parts):
        for b, items in enumerate(rows[p]):
            if not items:
                continue
            offset = first[b] + sum(counts[q][b] for q in range(p))
            starts = torch.tensor([0] + [units[i] for i in items]).cumsum(0)[:-1].tolist()
            pieces = [layouts[i] + torch.tensor([s, 0]) * (layouts[i] >= 0) for i, s in zip(items, starts)]
            flat = torch.cat(pieces)
            where = mask[b].cpu()
            image_id[b, where] = torch.where(flat[:, 0] >= 0, flat[:, 0] + offset, -1)
            patch_id[b, where] = flat[:, 1]
    return image_id.to(device), patch_id.to(device), per_sample.to(device)


class LlavaNextAdapter(Adapter):
    """LLaVA-NeXT: per image a base crop plus unpadded tiles with row-end newline tokens."""

    family = "LLaVA-NeXT"
    vision_merge_refusal = "merged tokens have no place on the anyres grid (unpadding, row-end newlines)"

    def __init__(self, model: nn.Module, reducer: Reducer):
        super().__init__(model, reducer)
        cfg, vcfg = model.config, model.config.vision_config
        if cfg.vision_feature_select_strategy != "default":
            raise ValueError(
                "attach: only vision_feature_select_strategy='default' (CLS dropped, one token per patch) "
                f"is supported, got {cfg.vision_feature_select_strategy!r}"
            )
        check_feature_layer(model, reducer)
        self.outer = model.model
        self.lm = model.model.language_model
        self.vision_tower = model.model.vision_tower
        self.text_config = cfg.text_config
        self.image_token_id = cfg.image_token_id
        self.patches = (vcfg.image_size // vcfg.patch_size) ** 2
        self.info = llava_info(model, self.patches, self.text_config._attn_implementation)
        self._image_call: dict | None = None
        self._prompt_images: list[PromptImage] = []  # of the last segment() (the prefill under way)
        self.setup()

    def install(self) -> None:
        super().install()
        self._undo.append(record_calls(self.outer, "get_image_features", self._record_image_call))

    def _record_image_call(self, arguments: dict) -> None:
        # only what the layout needs (not the pixels: they would stay alive until the next call)
        self._image_call = {k: arguments.get(k) for k in ("image_sizes", "vision_feature_select_strategy")}

    def visual_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return ids == self.image_token_id

    def crop_counts(self, image_sizes) -> list[int]:
        """Crops (base view + tiles) the model encodes for each image, by transformers' own rule."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.model.config
        return [
            image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            for size in image_sizes
        ]

    def layouts(self, image_sizes, crops: list[int]) -> list[torch.Tensor]:
        """Per image ``(crop, patch)`` of each of its tokens, -1 for a newline: ``pack_image_features``
        run on patch indices (float64 holds them exactly) instead of features."""
        p = self.patches
        indices = [torch.arange(n * p, dtype=torch.float64).view(n, p, 1) for n in crops]
        newline = torch.full((1,), -1.0, dtype=torch.float64)
        packed, _ = self.outer.pack_image_features(
            indices, image_sizes, vision_feature_select_strategy="default", image_newline=newline
        )
        flat = [t[:, 0].long() for t in packed]
        return [
            torch.stack([torch.where(t >= 0, t // p, -1), torch.where(t >= 0, t % p, -1)], 1) for t in flat
        ]

    def segment(self, ids, visual, kwargs):
        # the last encoding: generate(use_cache=False) re-runs the prefill on features encoded once
        call = self._image_call
        if call is None or call.get("image_sizes") is None:
            raise ValueError("attach: the prompt has image tokens but no images (pixel_values, image_sizes)")
        if call.get("vision_feature_select_strategy") not in (None, "default"):
            raise ValueError("attach: only vision_feature_select_strategy='default' is supported")
        sizes = call["image_sizes"]
        crops = self.crop_counts(sizes)
        layouts = self.layouts(sizes, crops)
        image_id, patch_id, per_sample = place_units([(visual, layouts, crops)], visual.shape, visual.device)
        self._prompt_images = self.anyres_images(visual, image_id, sizes, [len(t) for t in layouts])
        return image_id, patch_id, per_sample

    def anyres_images(self, visual, image_id, image_sizes, lengths: list[int]) -> list[PromptImage]:
        """Each prompt image's slots (its crops' tokens and newlines), crops (base view first) and tile
        grid (transformers' ``get_anyres_image_grid_shape``, as ``pack_image_features`` stitches it)."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        cfg = self.model.config
        images = []
        for b, row in enumerate(assign_images(lengths, visual.sum(1).tolist())):
            slots = visual[b].nonzero()[:, 0].split([lengths[i] for i in row])
            for i, at in zip(row, slots):
                units = image_id[b, at].unique()
                grid = get_anyres_image_grid_shape(
                    image_sizes[i], cfg.image_grid_pinpoints, cfg.vision_config.image_size
                )
                images.append(PromptImage(b, at, units[units >= 0].tolist(), tuple(grid)))
        return images

    def prompt_images(self, state: Prefill) -> list[PromptImage]:
        return self._prompt_images

    def vision_cls_attentions(self) -> list[nn.Module]:
        return clip_attentions(self.vision_tower)

    def vision_features(self, tower_output) -> torch.Tensor:
        return feature_layer_output(self.model, tower_output)
