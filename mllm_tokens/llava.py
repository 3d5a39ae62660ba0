"""Adapter for transformers ``LlavaForConditionalGeneration`` (LLaVA-1.5: a LLaMA-family language model,
a CLIP vision tower, a fixed number of visual tokens per image).

What it touches in transformers: forward pre-hooks on ``LlavaForConditionalGeneration`` (labels check),
``LlavaModel`` (``input_ids``), the vision tower (start of a vision pass) and the language model and its
decoder layers (see :mod:`visattn.mllm_tokens._adapter`); the attention implementation of the text
config (and of the vision config when [CLS] rows are scored) is routed through visattn's
``AttentionInterface`` function for the layers a reducer needs.
"""

from __future__ import annotations

import torch
from torch import nn

from visattn.mllm_tokens._adapter import Adapter
from visattn.mllm_tokens._core import ModelInfo, Reducer


def is_supported(model: nn.Module) -> bool:
    """True for a transformers ``LlavaForConditionalGeneration``."""
    try:
        from transformers import LlavaForConditionalGeneration
    except ImportError:
        return False
    return isinstance(model, LlavaForConditionalGeneration)


def fixed_segments(visual: torch.Tensor, per_image: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(image_id, patch_id, images_per_sample)`` when every image has ``per_image`` visual tokens,
    laid out image after image (``visual`` ``[B, L]`` bool)."""
    counts = visual.sum(1)
    if bool((counts % per_image != 0).any()):
        raise ValueError(
            f"attach: each sample needs a multiple of {per_image} image tokens, got {counts.tolist()}"
        )
    flat = visual.flatten().cumsum(0).view(visual.shape) - 1
    image_id = torch.where(visual, flat // per_image, -1)
    patch_id = torch.where(visual, flat % per_image, -1)
    return image_id, patch_id, counts // per_image


def clip_layers(tower: nn.Module) -> list[nn.Module]:
    """The encoder layers of a CLIP / SigLIP vision tower."""
    return list((tower.vision_model if hasattr(tower, "vision_model") else tower).encoder.layers)


def clip_attentions(tower: nn.Module) -> list[nn.Module]:
    """The self-attention module of every layer of a CLIP / SigLIP vision tower."""
    return [layer.self_attn for layer in clip_layers(tower)]


def check_feature_layer(model: nn.Module, reducer: Reducer) -> None:
    """A reducer that rewrites the projector's input (``needs_vision_features``) needs it from one layer."""
    layer = model.config.vision_feature_layer
    if reducer.needs_vision_features and not isinstance(layer, int):
        raise ValueError(
            f"attach: {type(reducer).__name__} needs one vision feature layer, got "
            f"vision_feature_layer={layer!r}"
        )


def feature_layer_output(model: nn.Module, tower_output) -> torch.Tensor:
    """``[views, 1 + patches, Dv]``: the vision tower's hidden states at ``config.vision_feature_layer``."""
    return tower_output.hidden_states[model.config.vision_feature_layer]


def llava_info(model: nn.Module, patches: int, impl: str) -> ModelInfo:
    """:class:`ModelInfo` of a LLaVA-style model (``config.text_config`` / ``config.vision_config``)."""
    tcfg, vcfg = model.config.text_config, model.config.vision_config
    return ModelInfo(
        num_layers=tcfg.num_hidden_layers,
        hidden_size=tcfg.hidden_size,
        num_heads=tcfg.num_attention_heads,
        num_kv_heads=tcfg.num_key_value_heads,
        intermediate_size=tcfg.intermediate_size,
        vision_layers=vcfg.num_hidden_layers,
        patches_per_image=patches,
        attn_implementation=impl,
    )


class LlavaAdapter(Adapter):
    """LLaVA-1.5: one run of ``(image_size / patch_size)^2`` image tokens per image."""

    family = "LLaVA"

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
        self.setup()
        merging, layer = reducer.vision_merge_layers(self.info), cfg.vision_feature_layer
        # hidden_states[i] is the output of vision layer i - 1: the features must follow the last merge
        features_of = layer % (vcfg.num_hidden_layers + 1) - 1 if isinstance(layer, int) else None
        if merging and features_of != merging[-1]:
            raise ValueError(
                f"attach: {type(reducer).__name__} merges in vision layers 0..{merging[-1]}, but the "
                f"language model takes vision_feature_layer={layer!r}; merge up to the layer it takes"
            )

    def visual_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return ids == self.image_token_id

    def segment(self, ids, visual, kwargs):
        return fixed_segments(visual, self.patches)

    def vision_cls_attentions(self) -> list[nn.Module]:
        return clip_attentions(self.vision_tower)

    def vision_features(self, tower_output) -> torch.Tensor:
        return feature_layer_output(self.model, tower_output)

    def vision_merge_points(self) -> list[nn.Module]:
        return [layer.layer_norm2 for layer in clip_layers(self.vision_tower)]
