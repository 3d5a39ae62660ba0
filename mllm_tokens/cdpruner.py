"""CDPruner (Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token
Pruning in MLLMs", NeurIPS 2025; official code Theia-4869/CDPruner, ``llava/model/llava_arch.py``,
``encode_images``).

Before the language model, each image keeps the MAP subset of a conditional determinantal point process
over its visual tokens ``v_i`` (the projector outputs, i.e. the LLM input embeddings of the image):

* similarity ``S_ij = cos(v_i, v_j)``;
* relevance ``r_i = mean_t(-cos(v_i, t))`` over the instruction's embeddings ``t`` (negated, as in the
  official code: the authors call the sign deliberate), then min-max normalised over the image,
  ``(r - min + 1e-6) / (max - min)``;
* kernel ``L_ij = r_i S_ij r_j``; greedy MAP inference with the incremental Cholesky update, exactly
  ``keep`` steps, the first maximum on ties; the picked tokens keep their raster order.

The shortened sequence gets contiguous position ids on LLaVA-style models (the official code drops the
other tokens from the input embeddings) and keeps its M-RoPE ids on Qwen2-VL. Official budgets: 64 /
128 / 192 visual tokens of LLaVA-1.5's 576 (the README's examples 64 and 128); anyres crops each keep
the budget (here an int budget scales with a crop's tokens, :func:`~visattn.mllm_tokens.fastv.keep_budgets`).

Differences: the official relevance compares CLIP's joint space (the feature layer through
``post_layernorm`` and ``visual_projection``) with the question's CLIP text-tower embedding; transformers'
LLaVA / Qwen checkpoints carry no text tower, so here the image's LLM input embeddings are compared with
the LLM input embeddings of the prompt's text tokens (every real token that is not an image placeholder:
the adapter cannot tell the question from the chat template). The official min-max runs over the whole
batch of crops; here over each image (unit) alone, so a sample's choice does not depend on its batch.
Where the official code divides by zero (a constant relevance) or takes square roots of non-positive
gains (``keep`` above the kernel's rank), this one raises a ``ValueError``; ``keep`` equal to an image's
tokens keeps them all without running the greedy loop (the same set).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from visattn.mllm_tokens._core import ModelInfo, Prefill, Reducer
from visattn.mllm_tokens.divprune import image_groups
from visattn.mllm_tokens.fastv import keep_budgets, keep_count


def conditional_kernel(features: torch.Tensor, text: torch.Tensor, text_ok: torch.Tensor) -> torch.Tensor:
    """CDPruner's kernel ``L = r_i S_ij r_j``.

    Args:
        features: ``[G, N, D]`` visual tokens of G images.
        text: ``[G, M, D]`` instruction embeddings of each image's sample; ``text_ok`` ``[G, M]`` bool
            marks the real ones (samples have different text lengths).

    Returns:
        ``[G, N, N]`` float32.
    """
    v = F.normalize(features.float(), dim=-1)
    t = F.normalize(text.float(), dim=-1)
    similarity = v @ v.transpose(1, 2)
    cosine = (v @ t.transpose(1, 2)).masked_fill(~text_ok[:, None], 0.0)  # [G, N, M]
    relevance = -cosine.sum(-1) / text_ok.sum(-1, keepdim=True)
    low, high = relevance.amin(1, keepdim=True), relevance.amax(1, keepdim=True)
    if bool((high == low).any()):
        raise ValueError("CDPruner: an image's relevance to the instruction is constant (no ranking)")
    relevance = (relevance - low + 1e-6) / (high - low)
    return relevance[:, :, None] * similarity * relevance[:, None, :]


def dpp_greedy_map(kernel: torch.Tensor, count: int) -> torch.Tensor:
    """Greedy MAP inference of a DPP (incremental Cholesky update).

    Args:
        kernel: ``[G, N, N]`` positive semi-definite kernels.
        count: items picked per kernel (1..N).

    Returns:
        ``[G, count]`` long: the picked indices in pick order.
    """
    groups, n = kernel.shape[:2]
    rows = torch.arange(groups, device=kernel.device)
    cis = kernel.new_zeros(count, groups, n)
    gains = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # [G, N] marginal log-det gains
    picks = []
    for i in range(count):
        j = gains.argmax(-1)
        gain = gains[rows, j]
        if not bool((gain > 0).all()):
            raise ValueError(
                f"CDPruner: pick {i + 1} of {count} has no positive gain: keep exceeds the rank of an "
                "image's kernel (at most the embedding width); lower keep"
            )
        e = (kernel[rows, j] - torch.einsum("tg,tgn->gn", cis[:i, rows, j], cis[:i])) / gain.sqrt()[:, None]
        cis[i] = e
        gains = gains - e.square()
        gains[rows, j] = float("-inf")
        picks.append(j)
    return torch.stack(picks, 1)


class CDPruner(Reducer):
    """Keep, per image, the ``keep`` tokens of the greedy MAP set of the instruction-conditioned DPP.

    Args:
        keep: kept visual tokens per image: an int count (official 64 / 128 / 192 of LLaVA-1.5's 576)
            or a fraction in (0, 1] of the image's tokens.
    """

    def __init__(self, keep: int | float = 64):
        keep_count(keep, 1 << 30, "CDPruner")
        self.keep = keep
        self._patches = 0

    def __repr__(self) -> str:
        return f"CDPruner(keep={self.keep})"

    def check(self, info: ModelInfo) -> None:
        count = keep_count(self.keep, info.patches_per_image or 1 << 30, "CDPruner")
        if (isinstance(self.keep, int) or info.patches_per_image) and count > info.hidden_size:
            raise ValueError(
                f"CDPruner: keep={count} exceeds the rank of the DPP kernel (at most the embedding width "
                f"{info.hidden_size})"
            )
        self._patches = info.patches_per_image

    def pre_llm(self, state: Prefill) -> torch.Tensor | None:
        features = state.embeds[state.visual]  # [Nv, D]
        sample = state.visual.nonzero()[:, 0]  # [Nv] owner of each visual token
        text_ok = state.real & ~state.media  # [B, L] the prompt's text tokens
        width = int(text_ok.sum(1).max())
        # each sample's text tokens packed to the left of a [B, width] table
        order = torch.argsort((~text_ok).to(torch.int8), dim=1, stable=True)[:, :width]
        text = state.embeds.gather(1, order[..., None].expand(-1, -1, state.embeds.shape[-1]))
        text_ok = text_ok.gather(1, order)
        budgets = keep_budgets(self.keep, state.image_tokens, self._patches)
        chosen = torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)
        for slots, count in image_groups(state, budgets):
            if count == slots.shape[1]:
                chosen[slots.flatten()] = True
                continue
            owner = sample[slots[:, 0]]
            if bool((text_ok[owner].sum(1) == 0).any()):
                raise ValueError("CDPruner: a sample with images has no text tokens to condition on")
            kernel = conditional_kernel(features[slots], text[owner], text_ok[owner])
            chosen[slots.gather(1, dpp_greedy_map(kernel, count)).flatten()] = True
        keep = ~state.visual
        keep[state.visual] = chosen
        return keep
