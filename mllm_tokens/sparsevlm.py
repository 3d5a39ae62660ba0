"""SparseVLM (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference", ICML 2025; official code Gumpest/SparseVLMs, branch v1.5 = the ICML release,
``llava/model/language_model/modelling_sparse_llama.py``, ``score.py``, ``utils.py``).

Text-guided pruning inside the language model, at a few sparse layers:

* raters, chosen once from the layer-0 input (projector outputs and word embeddings): for the text
  after the image, ``softmax over the text of (visual . text)`` averaged over the visual tokens; the
  text tokens scoring above the mean rate the image;
* at a sparse layer (which itself runs on the full sequence), every visual token is scored by that
  layer's attention (after RoPE) from the raters, averaged over heads and raters (through
  :func:`visattn.kernels.attention_with_key_mass` with the raters as query set); the top
  ``min(count, n - 1)`` visual tokens stay, in order;
* recycling: of the deleted tokens, the ``int(0.3 n_del) + 1`` best scored are clustered (DPC-kNN on
  the layer's output: distances ``/ sqrt(C)``, density ``exp(-mean squared distance to the k nearest)``
  with ``k`` = the number of clusters ``int(m / 10) + 1``, centres = top density x distance to a
  denser token) and each cluster's mean (official: sum / (count + 1e-6)) is put right after the kept
  visual tokens; recycled tokens count as visual at later sparse layers;
* positions are re-numbered (contiguous) after each sparse layer; decode steps move down alike.

Qwen2-VL / Qwen2.5-VL (no official path; the extension used by the other in-LLM reducers there): kept
tokens keep their ``(t, h, w)`` M-RoPE ids and stay in their slots, each recycled token takes the slot
and ids of its cluster centre (one of the deleted tokens) instead of following the kept ones, and decode
steps keep the model's own numbering (``rope_deltas``).

Official v1.5 settings for LLaVA-1.5-7B: sparse layers 2, 6, 15 of 32; per-layer counts
64 -> (66, 30, 17), 128 -> (303, 110, 36), 192 -> (300, 200, 110) (``tokens=`` presets). The defaults
express the layers as fractions of the depth (2/32, 6/32, 15/32).

Differences: the official code runs batch 1 with one image (system prompt length from the input);
here batches are left padded and each image is ranked, recycled and compacted on its own (its
recycled tokens follow its kept tokens), with the per-layer counts per image. The official density
adds a random jitter of up to 1e-6 (results vary from run to run); here there is none, so equal
densities are not "denser" than each other. Scores are float32 means over heads and raters (the
official code averages the softmax in the model dtype). v1.0's adaptive keep count
(``rank_rule``; README settings 64 -> (0.8, 0), 128 -> (9, 6), 192 -> (13.5, 0) at layers 2, 6, 15, 19)
needs the raters' attention rows, not only their mean: they come from one extra q/k projection of the
sparse layer's input (:meth:`ModelOps.layer_qk`), ``raters x tokens`` per sample, never ``N x N``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from visattn.mllm_tokens._core import ModelInfo, Prefill, Reducer, check_budget

OFFICIAL_LAYERS = (2 / 32, 6 / 32, 15 / 32)  # v1.5: layers 2, 6, 15 of LLaVA-1.5-7B's 32
V1_0_LAYERS = (2 / 32, 6 / 32, 15 / 32, 19 / 32)  # v1.0: layers 2, 6, 15, 19
PRESETS = {64: (66, 30, 17), 128: (303, 110, 36), 192: (300, 200, 110)}  # tokens -> per-layer counts
RANK_PRESETS = {64: (0.8, 0.0), 128: (9.0, 6.0), 192: (13.5, 0.0)}  # v1.0 README: tokens -> (scale, bias)
RATERS = "sparsevlm_raters"


def text_raters(hidden: torch.Tensor, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` bool: the text tokens (``text``) whose mean, over the visual tokens, of the softmax over
    the text of ``visual . text`` (``hidden`` ``[B, L, D]``) is above the mean over the text."""
    raters = torch.zeros_like(text)
    for b in range(hidden.shape[0]):
        v, t = hidden[b, visual[b]].float(), hidden[b, text[b]].float()
        if v.shape[0] == 0 or t.shape[0] == 0:
            continue
        relation = (v @ t.T).softmax(1).mean(0)  # [text]
        raters[b, text[b].nonzero()[:, 0]] = relation > relation.mean()
    return raters


def dpc_knn_merge(x: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster ``x`` ``[N, C]`` into ``clusters`` groups (DPC-kNN, as the official ``cluster_and_merge``
    without its random jitter): each group's mean ``[clusters, C]`` and its centre (a row of ``x``,
    ``[clusters]`` long), ordered by centre score."""
    n, c = x.shape
    xf = x.float()
    dist = torch.cdist(xf, xf) / c**0.5
    density = (-(dist.topk(clusters, dim=1, largest=False).values ** 2).mean(1)).exp()
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    parent_dist = dist.masked_fill(~denser, float("inf")).amin(1)
    parent_dist = torch.where(denser.any(1), parent_dist, dist.max())
    centres = (parent_dist * density).topk(clusters).indices
    assign = dist[centres].argmin(0)  # [N]: nearest centre
    assign[centres] = torch.arange(clusters, device=x.device)
    sums = torch.zeros(clusters, c, dtype=torch.float32, device=x.device).index_add_(0, assign, xf)
    counts = torch.bincount(assign, minlength=clusters).float()[:, None]
    return (sums / (counts + 1e-6)).to(x.dtype), centres


class SparseVLM(Reducer):
    """Prune (and recycle) visual tokens at sparse layers, scored by the attention of text raters.

    Args:
        tokens: a preset (64, 128, 192) giving the official v1.5 per-layer counts.
        counts: explicit kept visual tokens per image at each sparse layer (instead of ``tokens``).
        layers: sparse layers: ints or floats in [0, 1) (fractions of the depth); default the official
            2, 6, 15 of 32 (v1.0: 2, 6, 15, 19).
        recycle: aggregate the best deleted tokens into recycled tokens (official default True).
        rank_rule: ``(scale, bias)``, or True for the ``tokens`` preset: v1.0's adaptive count
            ``min(int(rank(R) x scale + bias), n - 1)`` instead of ``counts``, where ``R`` is the
            rater x visual attention matrix of the sparse layer (mean over heads); an image whose
            ``R`` has rank ``n`` is left unpruned.
    """

    renumber_positions = True

    def __init__(
        self,
        tokens: int | None = 192,
        counts: Sequence[int] | None = None,
        layers: Sequence[int | float] | None = None,
        recycle: bool = True,
        rank_rule: tuple[float, float] | bool = False,
    ):
        if rank_rule is True:
            if tokens not in RANK_PRESETS:
                raise ValueError(
                    f"SparseVLM: rank_rule=True needs tokens in {sorted(RANK_PRESETS)}, got {tokens!r}"
                )
            rank_rule = RANK_PRESETS[tokens]
        if rank_rule is not False and not (
            isinstance(rank_rule, tuple)
            and len(rank_rule) == 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in rank_rule)
        ):
            raise ValueError(
                f"SparseVLM: rank_rule must be False, True or (scale, bias) >= 0, got {rank_rule!r}"
            )
        layers = tuple((V1_0_LAYERS if rank_rule else OFFICIAL_LAYERS) if layers is None else layers)
        if not layers or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in layers):
            raise ValueError(
                f"SparseVLM: layers must be a non-empty sequence of ints or floats, got {layers!r}"
            )
        if any(
            (isinstance(x, float) and not 0.0 <= x < 1.0) or (isinstance(x, int) and x < 0) for x in layers
        ):
            raise ValueError(f"SparseVLM: layers must be ints >= 0 or fractions in [0, 1), got {layers}")
        if rank_rule:
            counts = (1,) * len(layers)  # unused: the rank rule decides
        elif counts is None:
            if tokens not in PRESETS:
                raise ValueError(
                    f"SparseVLM: tokens must be one of the presets {sorted(PRESETS)}, got {tokens!r} "
                    "(pass counts= for other per-layer budgets)"
                )
            counts = PRESETS[tokens]
        counts = tuple(counts)
        if len(counts) != len(layers) or not all(
            isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in counts
        ):
            raise ValueError(
                f"SparseVLM: counts must be {len(layers)} ints >= 1, one per sparse layer; got {counts!r}"
            )
        if not isinstance(recycle, bool):
            raise ValueError(f"SparseVLM: recycle must be a bool, got {recycle!r}")
        self.tokens, self.counts, self.layers, self.recycle = tokens, counts, layers, recycle
        self.rank_rule = rank_rule
        self._count: dict[int, int] = {}  # sparse layer -> kept visual tokens per image
        self._keep_ids = False  # multi-axis (M-RoPE) positions: no compaction, see after_layer

    def __repr__(self) -> str:
        budget = f"rank_rule={self.rank_rule}" if self.rank_rule else f"counts={self.counts}"
        return f"SparseVLM({budget}, layers={self.layers}, recycle={self.recycle})"

    def check(self, info: ModelInfo) -> None:
        depth = info.num_layers
        resolved = [round(x * depth) if isinstance(x, float) else x for x in self.layers]
        if any(b <= a for a, b in zip(resolved, resolved[1:])) or resolved[-1] > depth - 2:
            raise ValueError(
                f"SparseVLM: sparse layers {self.layers} give {resolved} on a {depth}-layer language "
                f"model; they must be strictly increasing layers in 0..{depth - 2}"
            )
        if not self.rank_rule:
            budget = f"counts={tuple(self.counts)}"
            if PRESETS.get(self.tokens) == tuple(self.counts):
                budget = f"tokens={self.tokens} (the preset {budget})"
            check_budget("SparseVLM", budget, max(self.counts), info.patches_per_image)
        self._count = dict(zip(resolved, self.counts))
        self._keep_ids = info.multi_axis_positions

    def key_mass_query(self, layer: int) -> str | None:
        return RATERS if layer in self._count else None

    def before_layer(self, layer: int, hidden: torch.Tensor, state: Prefill) -> None:
        if layer == 0:
            visual = state.current(state.visual)
            after_image = visual.long().flip(1).cumsum(1).flip(1) == 0
            raters = text_raters(hidden, visual, after_image & state.current(state.real))
            # a prompt without text after the image: its last token rates (the official code needs text)
            raters[:, -1] |= ~raters.any(1)
            state.query_sets[RATERS] = torch.zeros_like(state.visual).scatter(1, state.index, raters)
        if self.rank_rule and layer in self._count:
            state.extra["sparsevlm_relation"] = self._rater_rows(layer, hidden, state)

    @staticmethod
    def _rater_rows(layer: int, hidden: torch.Tensor, state: Prefill) -> list[torch.Tensor]:
        """Per sample ``[raters, Lc]``: layer ``layer``'s causal softmax attention rows of the raters on
        its input ``hidden``, mean over heads (v1.0's relation matrix; only the rater rows)."""
        q, k = state.ops.layer_qk(layer, hidden)
        raters = state.current(state.query_sets[RATERS])
        key_ok = state.current(state.real)
        k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
        slots = torch.arange(hidden.shape[1], device=hidden.device)
        rows = []
        for b in range(hidden.shape[0]):
            at = raters[b].nonzero()[:, 0]
            logits = torch.einsum("rhd,khd->hrk", q[b, at].float(), k[b].float()) * q.shape[-1] ** -0.5
            allowed = key_ok[b][None] & (slots[None] <= at[:, None])
            rows.append(logits.masked_fill(~allowed, float("-inf")).softmax(-1).mean(0))
        return rows

    def after_layer(self, layer: int, hidden: torch.Tensor, state: Prefill):
        count = self._count.get(layer)
        if count is None:
            return None
        score = state.key_mass[layer]
        visual = state.current(state.visual)
        image = state.current(state.image_id)
        keep = ~visual
        new_hidden = hidden.clone() if self.recycle else None
        for b, i in torch.unique(torch.stack([visual.nonzero()[:, 0], image[visual]], 1), dim=0).tolist():
            slots = (visual[b] & (image[b] == i)).nonzero()[:, 0]
            n = slots.numel()
            if self.rank_rule:
                rank = int(torch.linalg.matrix_rank(state.extra["sparsevlm_relation"][b][:, slots]))
                if rank == n:  # official: no sparsification (nor recycling) for this image
                    keep[b, slots] = True
                    continue
                count = int(rank * self.rank_rule[0] + self.rank_rule[1])
            top = score[b, slots].topk(min(count, n - 1)).indices.sort().values
            if not self.recycle:
                keep[b, slots[top]] = True
                continue
            deleted = torch.ones(n, dtype=torch.bool, device=slots.device)
            deleted[top] = False
            deleted = slots[deleted]
            chosen = deleted[score[b, deleted].topk(int(deleted.numel() * 0.3) + 1).indices]
            merged, centres = dpc_knn_merge(hidden[b, chosen], int(chosen.numel() / 10) + 1)
            if self._keep_ids:  # M-RoPE: kept tokens stay put, each recycled one takes its centre's slot
                new_hidden[b, chosen[centres]] = merged
                keep[b, slots[top]] = keep[b, chosen[centres]] = True
                continue
            content = torch.cat([hidden[b, slots[top]], merged])
            # compact: the image's first slots take its kept tokens, in order, then its recycled ones
            new_hidden[b, slots[: content.shape[0]]] = content
            keep[b, slots[: content.shape[0]]] = True
        return (keep, new_hidden) if self.recycle else keep
