"""ToMe (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023; facebookresearch/ToMe,
``tome/merge.py`` and ``tome/patch/timm.py``) applied to the visual tokens of LLaVA's CLIP tower as
LightCompress does (ModelTC/LightCompress ``llmc/compression/token_reduction/tome.py``).

Inside every vision layer up to the one LLaVA takes its features from, after the attention's residual
add and before the MLP, ``r`` tokens are merged by bipartite soft matching: the current tokens are split
alternately into sets A and B, each A token's best match in B is the most cosine-similar by that layer's
keys averaged over heads, the ``r`` A tokens with the best matches are merged into them (the [CLS] token
is never merged), and the sequence continues as the unmerged A tokens then B. A merged token is the
size-weighted average of its members and its size (the number of patches it stands for) is carried to
the next layers (``merge_wavg``), which attend to it with proportional attention (``+ log size`` on its
scores, facebookresearch's ``prop_attn``).

Here the tower's sequence keeps its length: every member of a merged token holds the merged value, so a
token of size s is s identical rows, which is exactly proportional attention for every query and leaves
the model's attention, norms and MLP untouched (the merge is written into the residual stream by a
pre-hook on ``layer_norm2``). The matching runs on one row per merged token, in ToMe's sequence order.
After the feature layer each image's merged tokens go to the LLM in that order, [CLS] dropped
(``vision_feature_select_strategy='default'``), with contiguous position ids.

Budget: the official ``r=16`` per layer (LightCompress's config; an int for every layer or one per
layer); each layer merges at most half of its non-[CLS] tokens (``r = min(r, (t - 1) // 2)``, as the
official code caps it). On CLIP ViT-L/14-336, layers 0..22 at r = 16 leave 576 - 368 = 208 tokens.

Differences: LightCompress passes no sizes to ``merge_wavg`` (every layer averages its current tokens
as if each stood for one patch) and runs plain SDPA (no proportional attention); facebookresearch/ToMe
carries the sizes and uses proportional attention, which is what the duplicated rows give here.
LightCompress merges in every layer (the last one too, which the -2 features never see).
"""

from __future__ import annotations

import torch

from visattn.mllm_tokens._core import ModelInfo, Prefill, Reducer, VisionPass, gather_tokens


def bipartite_matching(metric: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe's bipartite soft matching with the first token ([CLS]) protected.

    Args:
        metric: ``[V, t, C]`` the current tokens' keys; A = even positions, B = odd ones.
        r: A tokens to merge (already capped at ``(t - 1) // 2``).

    Returns:
        ``(unmerged [V, tA - r], merged [V, r], into [V, r])``: the A indices that stay (ascending), the A
        indices merged and the B index each one joins.
    """
    unit = metric / metric.norm(dim=-1, keepdim=True)
    scores = unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)  # [V, tA, tB]
    scores[:, 0] = float("-inf")  # [CLS] (A's first) never merges
    best, match = scores.max(dim=-1)
    ranked = best.argsort(dim=-1, descending=True)
    merged = ranked[:, :r]
    return ranked[:, r:].sort(dim=1).values, merged, match.gather(1, merged)


def merge_rows(
    x: torch.Tensor, unmerged: torch.Tensor, merged: torch.Tensor, into: torch.Tensor
) -> torch.Tensor:
    """``[V, t, C]`` -> ``[V, t - r, C]``: the unmerged A rows, then the B rows with their merged A rows
    added (sums: ToMe's ``merge(x * size, "sum")``; indices as :func:`bipartite_matching` returns them)."""
    a, b = x[:, ::2], x[:, 1::2]
    c = x.shape[2]
    added = b.scatter_add(
        1, into[..., None].expand(-1, -1, c), a.gather(1, merged[..., None].expand(-1, -1, c))
    )
    return torch.cat([a.gather(1, unmerged[..., None].expand(-1, -1, c)), added], 1)


class ToMe(Reducer):
    """Merge ``r`` visual tokens per vision layer by bipartite soft matching, sizes carried.

    Args:
        r: merged tokens per vision layer: an int for every merging layer (official 16) or a sequence
            with one count per layer from layer 0.
        layers: how many vision layers merge, from layer 0; default all but the last (the layer whose
            output LLaVA's ``vision_feature_layer=-2`` takes is the last one that merges).
    """

    def __init__(self, r: int | list[int] | tuple[int, ...] = 16, layers: int | None = None):
        counts = [r] if isinstance(r, int) else list(r) if isinstance(r, (list, tuple)) else None
        if not counts or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
            raise ValueError(f"ToMe: r must be an int >= 0 or a sequence of them, got {r!r}")
        if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 1):
            raise ValueError(f"ToMe: layers must be an int >= 1, got {layers!r}")
        self.r, self.layers = r, layers
        self._r: list[int] = []

    def __repr__(self) -> str:
        return f"ToMe(r={self.r}, layers={self.layers})"

    def check(self, info: ModelInfo) -> None:
        layers = self.layers if self.layers is not None else info.vision_layers - 1
        if layers > info.vision_layers:
            raise ValueError(f"ToMe: layers={layers} exceeds the {info.vision_layers}-layer vision encoder")
        if not isinstance(self.r, int) and len(self.r) != layers:
            raise ValueError(f"ToMe: r lists {len(self.r)} counts for {layers} merging vision layers")
        self._r = [self.r] * layers if isinstance(self.r, int) else list(self.r)

    def vision_merge_layers(self, info: ModelInfo) -> list[int]:
        return list(range(len(self._r)))

    def vision_merge(self, layer: int, hidden: torch.Tensor, vision: VisionPass) -> None:
        views, n, _ = hidden.shape
        state = vision.extra
        if layer == 0:
            order = torch.arange(n, device=hidden.device).expand(views, n)
            state.update(seq=order, group=order, size=hidden.new_ones(views, n, 1))
        seq, group, size = state["seq"], state["group"], state["size"]
        t = seq.shape[1]
        r = min(self._r[layer], (t - 1) // 2)
        if r > 0:
            unmerged, merged, into = bipartite_matching(gather_tokens(vision.keys[layer], seq).float(), r)
            a, b = slice(0, None, 2), slice(1, None, 2)
            weighted, keep = gather_tokens(hidden, seq) * size, t // 2 + t % 2 - r  # A tokens that stay
            # new sequence: unmerged A, then B (with the merged A tokens' weights and sizes added)
            seq = torch.cat([seq[:, a].gather(1, unmerged), seq[:, b]], 1)
            total = [merge_rows(x, unmerged, merged, into) for x in (weighted, size)]
            # old sequence index -> new one: A kept -> its rank, A merged -> keep + its B, B j -> keep + j
            remap = torch.empty(views, t, dtype=torch.long, device=hidden.device)
            remap[:, 1::2] = keep + torch.arange(t // 2, device=hidden.device)
            ranks = torch.arange(keep, device=hidden.device).expand(views, keep)
            remap[:, a] = remap[:, a].scatter(1, unmerged, ranks).scatter(1, merged, keep + into)
            group, size = remap.gather(1, group), total[1]
            hidden.copy_(gather_tokens(total[0] / size, group))
            state.update(seq=seq, group=group, size=size)
        if layer == len(self._r) - 1:
            vision.findings = [seq[:, 1:] - 1]  # patch index of each merged token, ToMe order, [CLS] out

    def pre_llm(self, state: Prefill) -> torch.Tensor | None:
        order = state.vision_findings[0]  # [images, m]
        embeds, keep = state.embeds.clone(), ~state.visual
        for image in state.ops.prompt_images(state):
            slots = image.slots  # the image's patches in raster order
            (unit,) = image.units
            chosen = slots[order[unit]]
            embeds[image.sample, slots[: chosen.numel()]] = state.embeds[image.sample, chosen]
            keep[image.sample, slots[: chosen.numel()]] = True
        state.embeds = embeds
        return keep
