"""DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication
Matters More", arXiv 2502.11494; official code ZichenWen1/DART,
``llava/model/language_model/modeling_llama_self.py``, ``get_retained_image_token``).

Before decoder layer ``K`` (official 2) the visual tokens are thinned by duplication, not importance:

* pivots: the ``pivots_image`` visual tokens and the ``pivots_text`` tokens after the image with the
  largest L1 norm of their layer ``K - 1`` keys (after RoPE, heads concatenated);
* for each pivot in turn, the ``per_pivot`` visual tokens least similar to it (cosine similarity of
  the final-norm-ed layer ``K - 1`` outputs, i.e. the model's last RMSNorm applied to them) are kept
  and leave the pool; the image pivots are kept too, the text pivots only select;
* ``per_pivot = keep // (pivots_image + pivots_text)`` (official ``TOKEN_TOPK`` from
  ``MAX_NUM_TRUNCTION = 128``): LLaVA-1.5 keeps ``4 + 8 x 16 = 132`` visual tokens, not 128.
* a fractional ``keep`` is the official Qwen2-VL / Qwen2.5-VL budget (``Qwen2-VL/Qwen2VL_DART``):
  ``per_pivot = int(n x keep / (pivots_image + pivots_text))`` with ``n`` the visual tokens, ``keep``
  = ``1 - reduction_ratio`` (official 0.778, so ``keep=0.222``). Images of dynamic resolution have no
  common token count, so an int ``keep`` there is checked per sample at the prefill.

Kept tokens keep their original position ids (the official code passes the kept indices as
``position_ids``) and layers ``K..L-1`` (and their KV cache) see only them.

Differences: the official code hard-codes the image start (35; Qwen2-VL: the first image's span, whose
length is the ``n`` of the fractional budget), runs batch 1 and walks the pivots in Python ``set`` order
(the hash order of their indices); here every sample is handled (left padding, several images: one
pool of all its visual tokens, the budget ``keep`` per image (a fraction: of all its visual tokens), the
text after the last image as text candidates, fewer text pivots if that text is shorter), and the
pivots are walked in ascending position. The keys come from one extra q/k projection of layer
``K - 1``'s input (:meth:`ModelOps.layer_qk`); the official code reads them out of that layer's attention.
Key norms change with absolute positions (RoPE): a left-padded batch needs position ids counted from
each row's first real token (``generate()`` passes them; a plain forward without ``position_ids`` counts the
padding too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from visattn.mllm_tokens._core import ModelInfo, Prefill, Reducer, check_budget


def _positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"DART: {name} must be an int >= {minimum}, got {value!r}")


def duplication_keep(
    key_norm: torch.Tensor,
    features: torch.Tensor,
    visual: torch.Tensor,
    text: torch.Tensor,
    pivots_image: int,
    pivots_text: int,
    per_pivot: torch.Tensor,
) -> torch.Tensor:
    """DART's selection over the slots of a layout.

    Args:
        key_norm: ``[B, Lc]`` pivot scores (L1 norm of the keys).
        features: ``[B, Lc, D]`` vectors compared by cosine similarity.
        visual / text: ``[B, Lc]`` bool: visual slots / text candidates for pivots.
        pivots_image / pivots_text: pivots per sample of each kind (fewer text pivots when ``text``
            has fewer slots).
        per_pivot: ``[B]`` long: tokens each pivot adds.

    Returns:
        ``[B, Lc]`` bool: the kept visual slots (image pivots and the tokens the pivots chose).
    """
    rows = torch.arange(visual.shape[0], device=visual.device)
    image_piv = key_norm.masked_fill(~visual, float("-inf")).topk(pivots_image, dim=1).indices
    n_text = min(pivots_text, int(text.sum(1).max()))
    text_piv = key_norm.masked_fill(~text, float("-inf")).topk(n_text, dim=1).indices
    text_ok = torch.arange(n_text, device=visual.device)[None] < text.sum(1, keepdim=True)
    pivots = torch.cat([image_piv, text_piv], dim=1)
    ok = torch.cat([torch.ones_like(image_piv, dtype=torch.bool), text_ok], dim=1)
    order = pivots.masked_fill(~ok, visual.shape[1]).argsort(dim=1)  # ascending position
    pivots, ok = pivots.gather(1, order), ok.gather(1, order)
    kept = torch.zeros_like(visual)
    kept[rows[:, None], image_piv] = True
    pool = visual & ~kept
    slots = torch.arange(visual.shape[1], device=visual.device)[None]
    for j in range(pivots.shape[1]):
        sim = F.cosine_similarity(features[rows, pivots[:, j]][:, None], features, dim=-1)
        rank = (-sim.float()).masked_fill(~pool, float("-inf")).argsort(dim=1, descending=True, stable=True)
        chosen = torch.zeros_like(pool).scatter_(1, rank, slots.expand_as(rank) < per_pivot[:, None])
        chosen &= ok[:, j : j + 1]
        kept |= chosen
        pool &= ~chosen
    return kept


class DART(Reducer):
    """Keep the visual tokens least duplicated with a few pivot tokens, from layer ``layer`` on.

    Args:
        layer: ``K``, the first layer that sees only the kept tokens (official 2).
        keep: the budget per image (official ``MAX_NUM_TRUNCTION`` 128); each pivot adds
            ``keep x images // (pivots_image + pivots_text)`` tokens. Or a fraction in (0, 1] of the
            sample's visual tokens (the official Qwen2-VL budget ``1 - reduction_ratio``, 0.222): each
            pivot adds ``int(visual tokens x keep / (pivots_image + pivots_text))``.
        pivots_image / pivots_text: pivot tokens of each kind (official 4 and 4).
    """

    def __init__(self, layer: int = 2, keep: int | float = 128, pivots_image: int = 4, pivots_text: int = 4):
        _positive_int("layer", layer)
        if isinstance(keep, float):
            if not 0.0 < keep <= 1.0:
                raise ValueError(f"DART: a fractional keep must be in (0, 1], got {keep}")
        else:
            _positive_int("keep", keep)
        _positive_int("pivots_image", pivots_image)
        _positive_int("pivots_text", pivots_text, minimum=0)
        if isinstance(keep, int) and keep < pivots_image + pivots_text:
            raise ValueError(
                f"DART: keep={keep} gives no token per pivot with {pivots_image + pivots_text} pivots"
            )
        self.layer, self.keep = layer, keep
        self.pivots_image, self.pivots_text = pivots_image, pivots_text
        self._patches = 0  # ModelInfo.patches_per_image (0: dynamic resolution)

    def __repr__(self) -> str:
        return (
            f"DART(layer={self.layer}, keep={self.keep}, pivots_image={self.pivots_image}, "
            f"pivots_text={self.pivots_text})"
        )

    def check(self, info: ModelInfo) -> None:
        if self.layer >= info.num_layers:
            raise ValueError(
                f"DART: layer={self.layer} is outside the {info.num_layers}-layer language model"
            )
        self._patches = info.patches_per_image
        if isinstance(self.keep, int):
            budget = f"keep={self.keep} plus {self.pivots_image} image pivots"
            check_budget("DART", budget, self.keep + self.pivots_image, info.patches_per_image)

    def before_layer(self, layer: int, hidden: torch.Tensor, state: Prefill) -> None:
        if layer == self.layer - 1:
            _, k = state.ops.layer_qk(layer, hidden)
            state.extra["dart_key_norm"] = k.float().abs().sum((-2, -1))  # heads concatenated

    def after_layer(self, layer: int, hidden: torch.Tensor, state: Prefill) -> torch.Tensor | None:
        if layer != self.layer - 1:
            return None
        visual = state.current(state.visual)
        after_image = visual.long().flip(1).cumsum(1).flip(1) == 0  # after the sample's last image token
        text = after_image & state.current(state.real)
        pivots = self.pivots_image + self.pivots_text
        if isinstance(self.keep, float):
            per_pivot = (state.original_visual.double() * self.keep / pivots).long()  # the official int()
        else:
            per_pivot = state.images_per_sample * self.keep // pivots
            need = state.images_per_sample * self.keep + self.pivots_image
            short = (need > state.original_visual) & (state.images_per_sample > 0)
            if self._patches == 0 and bool(short.any()):
                b = int(short.nonzero()[0, 0])
                raise ValueError(
                    f"DART: keep={self.keep} per image plus {self.pivots_image} image pivots needs "
                    f"{int(need[b])} visual tokens, but sample {b} has {int(state.original_visual[b])} "
                    "(images of dynamic resolution: a fractional keep, e.g. the official 0.222, fits any "
                    "size)"
                )
        kept = duplication_keep(
            state.extra.pop("dart_key_norm"), state.ops.final_norm(hidden), visual, text,
            self.pivots_image, self.pivots_text, per_pivot,
        )  # fmt: skip
        return ~visual | kept
