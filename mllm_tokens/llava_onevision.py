"""Adapter for transformers ``LlavaOnevisionForConditionalGeneration`` (LLaVA-OneVision: a SigLIP vision
tower, a Qwen2 language model; single images, several images and videos in one prompt).

Token layout, as transformers builds it: a single image of a sample is encoded "anyres" (a base view
plus unpadded tiles; when the tile grid has more than ``anyres_max_N`` crops' worth of tokens it is
bilinearly shrunk) with an ``image_newline`` token ending every tile row; each image of a multi-image
sample is one base view plus one newline; a video is ``frames x ceil(side / 2)^2`` pooled tokens and
one newline at the end, at the ``<video>`` positions.

For the reducers a *unit* ("image" in :class:`~visattn.mllm_tokens._core.Prefill`) is one image (its
base view and tiles together: the shrunk tile grid mixes crops, so tokens no longer belong to one
crop) or one video frame. Newline tokens are not visual: no reducer removes or counts them.
``ModelInfo.patches_per_image`` is the base view's ``(image_size / patch_size)^2`` tokens (729 for the
released 384-px towers); an ``int`` keep is per such view and scales with a unit's tokens
(``keep * n / patches``, :func:`~visattn.mllm_tokens.fastv.keep_budgets`), a fraction is a fraction
of every unit. VTC-CLS is refused at ``attach``: SigLIP has no [CLS] token.

Which token is a newline is recomputed with transformers' own ``pack_image_features`` (run on
placeholder values instead of features) from the arguments of the last ``get_image_features`` call
(``image_sizes``, ``batch_num_images``, ``vision_aspect_ratio``) and, for videos, the frame count of the
last ``get_video_features`` call; both are recorded by instance-level wrappers (see
:mod:`visattn.mllm_tokens.llava_next`), because generate() (transformers >= 5.24) encodes the images
before the prefill and passes only their features to the forward.

What it touches in transformers: those two wrappers, forward pre-hooks on the outer model (labels
check), ``LlavaOnevisionModel`` (``input_ids``) and the language model and its decoder layers (see
:mod:`visattn.mllm_tokens._adapter`); the attention of the text config is routed through visattn's
``AttentionInterface`` function for the layers a reducer needs.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from visattn.mllm_tokens._adapter import Adapter
from visattn.mllm_tokens._core import Reducer
from visattn.mllm_tokens.llava import llava_info
from visattn.mllm_tokens.llava_next import place_units, record_calls


def is_supported(model: nn.Module) -> bool:
    """True for a transformers ``LlavaOnevisionForConditionalGeneration``."""
    try:
        from transformers import LlavaOnevisionForConditionalGeneration
    except ImportError:
        return False
    return isinstance(model, LlavaOnevisionForConditionalGeneration)


def newline_layout(packed: torch.Tensor) -> torch.Tensor:
    """``[n, 2]`` (unit 0, rank) of one packed image whose newline rows are -1 (``(-1, -1)`` there)."""
    real = packed[:, 0] > -0.5
    rank = real.long().cumsum(0) - 1
    return torch.stack([torch.where(real, 0, -1), torch.where(real, rank, -1)], 1)


class LlavaOnevisionAdapter(Adapter):
    """LLaVA-OneVision: anyres or multi-image ``<image>`` tokens and pooled ``<video>`` frames."""

    family = "LLaVA-OneVision"
    vision_merge_refusal = "SigLIP has no [CLS] token, and the anyres grids need every view's patches"

    def __init__(self, model: nn.Module, reducer: Reducer):
        super().__init__(model, reducer)
        cfg, vcfg = model.config, model.config.vision_config
        self.outer = model.model
        self.lm = model.model.language_model
        self.vision_tower = model.model.vision_tower
        self.text_config = cfg.text_config
        self.image_token_id, self.video_token_id = cfg.image_token_id, cfg.video_token_id
        side = vcfg.image_size // vcfg.patch_size
        self.patches = side * side
        self.frame_tokens = math.ceil(side / 2) ** 2  # transformers' apply_pooling: 2x bilinear
        self.info = llava_info(model, self.patches, self.text_config._attn_implementation)
        self.info.patch_grid = False  # a unit is an image's views together, or a pooled frame
        self._calls: dict[str, dict] = {}
        self.setup()

    def install(self) -> None:
        super().install()
        for name in ("get_image_features", "get_video_features"):
            self._undo.append(record_calls(self.outer, name, functools.partial(self._record, name)))

    def _record(self, name: str, arguments: dict) -> None:
        """Keep what the layouts need of a call (not the pixels: they would stay alive until the next)."""
        if name == "get_video_features":  # pixel_values_videos [videos, frames, C, H, W], first argument
            self._calls[name] = {"videos_frames": tuple(next(iter(arguments.values())).shape[:2])}
        else:
            keys = ("image_sizes", "batch_num_images", "vision_aspect_ratio")
            self._calls[name] = {k: arguments.get(k) for k in keys}

    def visual_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids == self.image_token_id) | (ids == self.video_token_id)

    def _last_call(self, name: str, what: str) -> dict:
        call = self._calls.get(name)
        if call is None:
            raise ValueError(f"attach: the prompt has {what} tokens but no {what}s were encoded")
        return call

    def image_layouts(self, call: dict) -> tuple[list[torch.Tensor], list[int]]:
        """Per image its ``(unit, rank)`` layout (one unit per image) and unit counts."""
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        cfg = self.model.config
        sizes, per_sample = call["image_sizes"], call.get("batch_num_images")
        if per_sample is None:  # transformers' rule: without batch_num_images every image is anyres
            anyres = [True] * len(sizes)
        else:
            anyres = [int(n) == 1 for n in per_sample for _ in range(int(n))]
        crops = [
            image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            if tiled
            else 1
            for size, tiled in zip(sizes, anyres)
        ]
        placeholders = [torch.zeros(n, self.patches, 1, dtype=torch.float64) for n in crops]
        newline = torch.full((1,), -1.0, dtype=torch.float64)
        ratio = call.get("vision_aspect_ratio") or cfg.vision_aspect_ratio
        packed, _ = self.outer.pack_image_features(
            placeholders, sizes, image_newline=newline, vision_aspect_ratio=ratio
        )
        return [newline_layout(t) for t in packed], [1] * len(packed)

    def video_layouts(self, call: dict) -> tuple[list[torch.Tensor], list[int]]:
        """Per video its ``(frame, patch)`` layout (one unit per frame, then the newline)."""
        videos, frames = call["videos_frames"]
        index = torch.arange(frames * self.frame_tokens)
        layout = torch.stack([index // self.frame_tokens, index % self.frame_tokens], 1)
        layout = torch.cat([layout, layout.new_full((1, 2), -1)])
        return [layout] * videos, [frames] * videos

    def segment(self, ids, visual, kwargs):
        # the last encodings: generate(use_cache=False) re-runs the prefill on features encoded once
        parts = []
        images = ids == self.image_token_id
        if bool(images.any()):
            parts.append((images, *self.image_layouts(self._last_call("get_image_features", "image"))))
        videos = ids == self.video_token_id
        if bool(videos.any()):
            parts.append((videos, *self.video_layouts(self._last_call("get_video_features", "video"))))
        return place_units(parts, ids.shape, ids.device)
