"""FasterVLM (Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make
VLM Inference Faster", arXiv 2412.01818; official code Theia-4869/FasterVLM,
``llava/model/multimodal_encoder/clip_encoder.py`` and ``llava/model/llava_arch.py``).

Before the projector, each image keeps the ``keep`` patches that the vision encoder's [CLS] token
attends to most: the post-softmax attention row of [CLS] to the patches in the layer LLaVA takes its
features from (official ``attentions[select_layer]`` with ``mm_vision_select_layer = -2``), averaged
over heads, ``topk``; the kept patches stay in raster order and the shortened sequence gets contiguous
position ids. Official budgets (README): ``--visual-token-num`` 144, 58 and 29 of 576, i.e. 75 %, 90 %
and 95 % reduction (288 for 50 %).

LLaVA-NeXT (official ``prepare_inputs_labels_for_multimodal``): every crop (base view and tiles) keeps
its own top ``keep`` of all its patches, and the tiles' masks then go through the same unpadding as the
features, so a tile keeps only those of its chosen patches that survive unpadding (the README counts
29 x 5 = 145 tokens for a 5-crop image); newline tokens always stay.

Only the [CLS] row of the scored layer is computed (through
:func:`visattn.kernels.attention_with_key_mass`); the official code asks the encoder for every
attention map (``output_attentions=True``). The official code selects before the projector; the
projector acts per token, so selecting the projected tokens (what the adapter does) gives the same
LLM input. Vision towers without a [CLS] token (SigLIP, the Qwen2-VL ViT) are refused at ``attach``.
"""

from __future__ import annotations

import torch

from visattn.mllm_tokens._core import ModelInfo, Prefill, Reducer
from visattn.mllm_tokens.fastv import keep_count


class FasterVLM(Reducer):
    """Keep each image's ``keep`` patches with the most [CLS] attention in vision layer ``layer``.

    Args:
        keep: kept patches per image (LLaVA-NeXT: per crop, before unpadding): an int count (official
            ``visual_token_num``; default 144 of 576) or a fraction in (0, 1] of the patches.
        layer: the vision layer whose [CLS] row ranks the patches, as an index of the encoder's
            attention maps (official ``select_layer`` -2: the layer whose output LLaVA takes).
    """

    def __init__(self, keep: int | float = 144, layer: int = -2):
        keep_count(keep, 1 << 30, "FasterVLM")
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"FasterVLM: layer must be an int, got {layer!r}")
        self.keep, self.layer = keep, layer
        self._count = 0

    def __repr__(self) -> str:
        return f"FasterVLM(keep={self.keep}, layer={self.layer})"

    def _layer(self, info: ModelInfo) -> int:
        layer = self.layer + info.vision_layers if self.layer < 0 else self.layer
        if not 0 <= layer < info.vision_layers:
            raise ValueError(
                f"FasterVLM: layer={self.layer} is outside the {info.vision_layers}-layer vision encoder"
            )
        return layer

    def check(self, info: ModelInfo) -> None:
        self._layer(info)
        # no common image size (Qwen2-VL): the adapter refuses the missing [CLS] token next
        self._count = keep_count(self.keep, info.patches_per_image or 1 << 30, "FasterVLM")

    def vision_cls_layers(self, info: ModelInfo) -> list[int]:
        return [self._layer(info)]

    def pre_llm(self, state: Prefill) -> torch.Tensor | None:
        score = state.cls_scores[0]  # [images, patches]
        chosen = torch.zeros_like(score, dtype=torch.bool)
        chosen.scatter_(1, score.topk(self._count, dim=1).indices, True)
        picked = chosen[state.image_id.clamp_min(0), state.patch_id.clamp_min(0)]
        return ~state.visual | (state.visual & picked)
