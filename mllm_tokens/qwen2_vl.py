"""Adapters for transformers ``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``
(a Qwen2 language model with M-RoPE, a native-resolution ViT whose ``PatchMerger`` turns every
``spatial_merge_size^2`` patches into one visual token; no [CLS] token).

What it touches in transformers: forward pre-hooks on ``Qwen2(_5)_VLForConditionalGeneration`` (labels
check), ``Qwen2(_5)_VLModel`` (``input_ids``, ``image_grid_thw``, ``video_grid_thw``), the language
model and its decoder layers (see :mod:`visattn.mllm_tokens._adapter`); the text config's attention
implementation is routed through visattn's ``AttentionInterface`` function for the layers a reducer
needs.

* Visual tokens: the image-pad and video-pad tokens. A reducer's "image" is one image or one whole video
  (``generate`` of recent releases hands the model pre-encoded media without the grids, and a video's
  frame count cannot be read back from that; a fraction ``keep`` is the same either way). Tokens per
  image vary (``t * h * w / merge^2``): ``ModelInfo.patches_per_image`` is 0.
* M-RoPE: the decoder layers get the rotary cos/sin of the ``(t, h, w)`` position ids (with a leading
  axis of 3 in transformers 5.4, mixed into ``[B, L, D]`` in later releases) and, under ``generate``,
  the 1-D text positions as ``position_ids``. Kept tokens keep their original ``(t, h, w)`` ids; decode
  steps keep the model's own numbering (``rope_deltas``), corrected where it counts a shortened cache.
  This holds for drops inside the language model too: PyramidDrop and SparseVLM, whose official LLaVA
  code renumbers the kept tokens contiguously, keep the original ids here (neither has an official
  Qwen2-VL path; DART's official Qwen2-VL code keeps the ids, ``position_ids[:, :, keep]``), and
  SparseVLM's recycled tokens take the ids of their cluster centres.
* VTC-CLS is refused: it ranks patches by the vision [CLS] token's attention, and this vision tower has
  none (see docs/mllm_tokens.md).
"""

from __future__ import annotations

import torch
from torch import nn

from visattn.mllm_tokens._adapter import Adapter, gather_positions
from visattn.mllm_tokens._core import ModelInfo, Reducer
from visattn.mllm_tokens.vtc_cls import VTCCLS


def _is(model: nn.Module, name: str) -> bool:
    import transformers

    cls = getattr(transformers, name, None)
    return cls is not None and isinstance(model, cls)


def is_supported(model: nn.Module) -> bool:
    """True for a transformers ``Qwen2VLForConditionalGeneration``."""
    return _is(model, "Qwen2VLForConditionalGeneration")


def is_supported_2_5(model: nn.Module) -> bool:
    """True for a transformers ``Qwen2_5_VLForConditionalGeneration``."""
    return _is(model, "Qwen2_5_VLForConditionalGeneration")


def media_sizes(kwargs: dict, kind: str, merge: int) -> torch.Tensor | None:
    """Visual tokens of each image (``kind="image"``) or video of a model call, in order: from
    ``<kind>_grid_thw`` (``t * h * w / merge^2``), or, where ``generate`` encoded the media beforehand
    (transformers 5.24 passes ``mm_encoder_outputs`` instead of the pixels and grids), from the per-item
    ``pooler_output`` of that encoding. None when the call has no such media."""
    grid = kwargs.get(f"{kind}_grid_thw")
    if grid is not None:
        return grid.long().prod(-1) // merge**2
    encoded = (kwargs.get("mm_encoder_outputs") or {}).get(kind)
    if encoded is None:
        return None
    items = encoded.pooler_output
    if not isinstance(items, (tuple, list)):
        raise RuntimeError(
            f"visattn: the pre-encoded {kind} features are no longer split per {kind}; this transformers "
            "release changed get_image_features / get_video_features"
        )
    return torch.tensor([len(item) for item in items])


def media_units(
    mask: torch.Tensor, sizes: torch.Tensor | None, what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(unit [B, L], patch [B, L])`` of the ``mask`` tokens (-1 elsewhere): the item (of ``sizes``, laid
    out in order over the flattened batch) each token belongs to, and its index inside the item."""
    count = int(mask.sum())
    if sizes is None:
        if count:
            raise ValueError(
                f"attach: input_ids hold {count} {what} tokens but no {what}_grid_thw came with them"
            )
        return torch.full_like(mask, -1, dtype=torch.long), torch.full_like(mask, -1, dtype=torch.long)
    sizes = sizes.to(mask.device)
    if int(sizes.sum()) != count:
        raise ValueError(
            f"attach: input_ids hold {count} {what} tokens but {what}_grid_thw describes {int(sizes.sum())}"
        )
    ordinal = mask.flatten().long().cumsum(0).view(mask.shape) - 1
    ends = sizes.cumsum(0)
    unit = torch.searchsorted(ends, ordinal, right=True).clamp(max=max(len(sizes) - 1, 0))
    patch = ordinal - (ends - sizes)[unit]
    return torch.where(mask, unit, -1), torch.where(mask, patch, -1)


class Qwen2VLAdapter(Adapter):
    """Qwen2-VL: dynamic resolution images (``image_grid_thw``) and videos (``video_grid_thw``)."""

    family = "Qwen2-VL"
    vision_merge_refusal = "its patch merger joins fixed 2 x 2 patch groups after the blocks"

    def __init__(self, model: nn.Module, reducer: Reducer):
        super().__init__(model, reducer)
        if isinstance(reducer, VTCCLS):
            raise ValueError(
                f"attach: VTCCLS ranks patches by the vision encoder's [CLS] attention, but {self.family}'s "
                "vision tower has no [CLS] token (its patches go straight to the merger); use FastV, VAR or "
                "DyVTE"
            )
        cfg = model.config
        self.outer = model.model
        self.lm = model.model.language_model
        self.vision_tower = model.model.visual
        self.text_config = self.lm.config
        if "sliding_attention" in getattr(self.text_config, "layer_types", ()):
            raise ValueError(
                "attach: sliding-window attention layers (use_sliding_window=True) are not supported: the "
                "masks of a shortened layout are full causal masks"
            )
        self.image_token_id, self.video_token_id = cfg.image_token_id, cfg.video_token_id
        self.merge = cfg.vision_config.spatial_merge_size
        tcfg = self.text_config
        self.info = ModelInfo(
            num_layers=tcfg.num_hidden_layers,
            hidden_size=tcfg.hidden_size,
            num_heads=tcfg.num_attention_heads,
            num_kv_heads=tcfg.num_key_value_heads,
            intermediate_size=tcfg.intermediate_size,
            vision_layers=cfg.vision_config.depth,
            patches_per_image=0,
            attn_implementation=tcfg._attn_implementation,
            multi_axis_positions=True,
            patch_grid=False,
        )
        self.setup()

    def visual_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids == self.image_token_id) | (ids == self.video_token_id)

    def segment(self, ids, visual, kwargs):
        """Images and videos numbered in order of appearance over the flattened batch."""
        b, length = ids.shape
        image, image_patch = media_units(
            ids == self.image_token_id, media_sizes(kwargs, "image", self.merge), "image"
        )
        video, video_patch = media_units(
            ids == self.video_token_id, media_sizes(kwargs, "video", self.merge), "video"
        )
        n_image = int(image.max()) + 1
        key = torch.where(video >= 0, video + n_image, image)  # a unit key per visual token, -1 elsewhere
        n_units = int(key.max()) + 1
        flat = torch.arange(b * length, device=ids.device).view(b, length)[visual]
        first = torch.full((n_units,), b * length, device=ids.device).scatter_reduce(
            0, key[visual], flat, "amin"
        )
        last = torch.full((n_units,), -1, device=ids.device).scatter_reduce(0, key[visual], flat, "amax")
        if bool((first // length != last // length).any()):
            raise ValueError("attach: an image's tokens span two samples; image_grid_thw / video_grid_thw "
                             "do not match the image tokens of input_ids")  # fmt: skip
        rank = torch.empty_like(first).scatter_(0, first.argsort(), torch.arange(n_units, device=ids.device))
        image_id = torch.where(visual, rank[key.clamp_min(0)], -1)
        patch_id = torch.where(video >= 0, video_patch, image_patch)
        images_per_sample = torch.bincount(first // length, minlength=b)
        return image_id, patch_id, images_per_sample

    # ------------------------------------------------------------------ M-RoPE positions
    def prefill_positions(self, kwargs, index, new_real):
        """Kept tokens keep their original ``(t, h, w)`` ids; the text row of ``[4, B, L]`` position ids
        (generate's; transformers builds masks and flash-attention sequence bounds from it) is made
        contiguous again so that it is not read as packed sequences."""
        pos = kwargs.get("position_ids")
        contiguous = super().prefill_positions(kwargs, index, new_real)
        if pos is None:
            return contiguous
        if pos.ndim == 2:
            pos = pos[None].expand(3, -1, -1)
        kept = gather_positions(pos, index)
        if kept.shape[0] == 4:
            kept = torch.cat([contiguous[None].to(kept.dtype), kept[1:]])
        return kept

    def decode_positions(self, kwargs):
        """Positions of a decode step after a pre-LLM reduction. Given ``position_ids`` (``generate``'s)
        or an ``attention_mask`` (full length), the model numbered the step from those: kept as they are.
        Given neither, it counted the KV cache, which the reduction shortened: add the removed tokens back
        (the model's ``cache length + rope_deltas`` as if nothing had been removed)."""
        outer, pos = self._call_kwargs, kwargs.get("position_ids")
        if pos is None or outer.get("position_ids") is not None or outer.get("attention_mask") is not None:
            return None
        return pos + self.pos_shift.to(pos.device)[:, None]


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: as Qwen2-VL (windowed attention inside the vision tower changes nothing here)."""

    family = "Qwen2.5-VL"
