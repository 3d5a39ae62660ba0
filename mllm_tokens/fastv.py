"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024; pkunlp-icler/FastV).

After decoder layer ``K - 1`` the visual tokens are ranked by the attention they received in that
layer (averaged over heads) and only the top ones continue into layers ``K..L-1``. Defaults follow
the official code: ``K = 2``, ``R = 50%`` (keep half), ranking by the LAST token's attention
(``scoring="last"``; the HF-LLaVA path ``fastv_forward``), kept tokens keep their ORIGINAL position
ids (RoPE is not re-indexed) and the KV cache of layers ``>= K`` holds only the kept tokens, decided
once at prefill. The paper describes the mean attention received from all tokens: ``scoring="all"``.
``scoring="text"`` averages over the text tokens only.

Scoring runs through :func:`visattn.kernels.attention_with_key_mass` inside layer ``K - 1``'s
attention, so it works under SDPA without ``output_attentions``.
"""

from __future__ import annotations

import torch

from visattn.mllm_tokens._core import ModelInfo, Prefill, Reducer, check_budget

SCORINGS = ("last", "all", "text")


def keep_count(keep: int | float, patches: int, name: str) -> int:
    """Tokens kept per image: an int count or a float fraction in (0, 1] of ``patches``."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise ValueError(f"{name}: keep must be an int count or a float fraction in (0, 1], got {keep!r}")
    if isinstance(keep, float):
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"{name}: a fractional keep must be in (0, 1], got {keep}")
        return max(1, round(patches * keep))
    if keep < 1:
        raise ValueError(f"{name}: keep={keep} must be at least 1")
    check_budget(name, f"keep={keep}", keep, patches)
    return keep


def keep_budgets(keep: int | float, tokens: torch.Tensor, patches: int) -> torch.Tensor:
    """``[images]`` kept tokens of images with ``tokens [images]`` visual tokens each.

    ``keep`` (checked by :func:`keep_count`) is per ``patches``-token image (``ModelInfo.patches_per_image``):
    an int count scales with the image's tokens (``keep * n / patches``, e.g. LLaVA-NeXT's tiles that lost
    rows to unpadding), a fraction is a fraction of ``n``; rounded, at least 1, 0 for an image without
    tokens. An image of exactly ``patches`` tokens keeps ``keep`` (int) or ``round(patches * keep)``.
    With ``patches == 0`` (images of no common size: Qwen2-VL's dynamic resolution) an int ``keep`` is
    per image, capped at the image's tokens.
    """
    if isinstance(keep, int) and patches == 0:
        return tokens.clamp(max=keep)
    ratio = keep / patches if isinstance(keep, int) else keep
    kept = (tokens.double() * ratio).round().clamp_min(1).long()
    return torch.where(tokens > 0, kept, 0)


def top_visual(scores: torch.Tensor, visual: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``[B, Lc]`` bool: per row the ``counts[b]`` highest-scoring visual slots."""
    masked = scores.float().masked_fill(~visual, float("-inf"))
    order = masked.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return visual & (rank < counts[:, None])


class FastV(Reducer):
    """Prune visual tokens inside the LLM after layer ``layer - 1``.

    Args:
        layer: ``K``, the first layer that sees only the kept tokens (official default 2).
        keep: kept visual tokens per image, an int count or a fraction (official ``1 - R = 0.5``).
            With several images per sample, all of a sample's visual tokens are ranked together and
            the images' budgets (:func:`keep_budgets`) are added up (the official code ranks the
            whole image span at once).
            On models whose images differ in size (``ModelInfo.patches_per_image == 0``: Qwen2-VL's
            dynamic resolution) an int budget is per image, capped at the image's tokens.
        scoring: ``"last"`` (official code), ``"all"`` (paper) or ``"text"`` queries.
    """

    def __init__(self, layer: int = 2, keep: int | float = 0.5, scoring: str = "last"):
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
            raise ValueError(
                f"FastV: layer must be an int >= 1 (pruning happens after layer - 1), got {layer!r}"
            )
        if scoring not in SCORINGS:
            raise ValueError(f"FastV: scoring must be one of {SCORINGS}, got {scoring!r}")
        keep_count(keep, 1 << 30, "FastV")
        self.layer, self.keep, self.scoring = layer, keep, scoring
        self._patches = 0

    def __repr__(self) -> str:
        return f"FastV(layer={self.layer}, keep={self.keep}, scoring={self.scoring!r})"

    def check(self, info: ModelInfo) -> None:
        if self.layer >= info.num_layers:
            raise ValueError(
                f"FastV: layer={self.layer} is outside the {info.num_layers}-layer language model"
            )
        keep_count(self.keep, info.patches_per_image or 1 << 30, "FastV")
        self._patches = info.patches_per_image

    def key_mass_query(self, layer: int) -> str | None:
        return self.scoring if layer == self.layer - 1 else None

    def after_layer(self, layer: int, hidden: torch.Tensor, state: Prefill) -> torch.Tensor | None:
        if layer != self.layer - 1:
            return None
        visual = state.current(state.visual)
        counts = state.per_sample(keep_budgets(self.keep, state.image_tokens, self._patches))
        return ~visual | top_visual(state.key_mass[layer], visual, counts)
