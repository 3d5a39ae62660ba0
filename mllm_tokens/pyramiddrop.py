"""PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid
Visual Redundancy Reduction", CVPR 2025; official code Cooperx521/PyramidDrop,
``llava/model/modeling_llama_pdrop.py``).

The language model is split into stages; at the start of each stage after the first, the visual tokens
are ranked by the attention the last instruction token pays them and only the top fraction continues.
As in the official code (``pdrop_rank_drop``), the ranking at stage layer ``l`` runs *that* layer's
input norm, q/k projections and RoPE on the hidden states entering it, takes the softmax attention row
of the last prompt token, averages it over heads and keeps the top visual tokens in their original
order; layer ``l`` and later see only those. The kept tokens get contiguous position ids and decode
steps at those layers shift down by the number of tokens dropped (``renumber_positions``).

Official LLaVA-1.5-7B settings: stage layers 8, 16, 24 of 32 and cumulative visual ratios 0.5, 0.25,
0.125 (lambda = 0.5): 576 -> 288 -> 144 -> 72 tokens, each count truncated (``int``). The defaults here
are those layers as fractions of the depth (1/4, 1/2, 3/4), so they carry over to other depths.

Qwen2-VL / Qwen2.5-VL (no official path): the kept tokens keep their ``(t, h, w)`` M-RoPE ids (a
contiguous renumbering has no meaning there), as FastV and DART's official Qwen2-VL code do, and decode
steps keep the model's own numbering (``rope_deltas``).

Differences: the official code asserts batch 1 at inference, right padding and one image (the first
image span); here batches are left padded and all of a sample's visual tokens are ranked together
with counts ``int(visual tokens x ratio)``. The last-token query row is scored through
:func:`visattn.kernels.attention_with_key_mass` (mean over heads in float32; the official code casts
the softmax back to the model dtype before averaging).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from visattn.kernels.ops.attention_with_key_mass import attention_with_key_mass
from visattn.mllm_tokens._core import ModelInfo, Prefill, Reducer
from visattn.mllm_tokens.fastv import top_visual

OFFICIAL_LAYERS = (0.25, 0.5, 0.75)  # 8, 16, 24 of LLaVA-1.5-7B's 32 layers


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class PyramidDrop(Reducer):
    """Drop visual tokens in stages, ranked by the last token's attention at each stage's first layer.

    Args:
        layers: the first layer of every stage after the first: ints (layer indices) or floats in
            (0, 1) (fractions of the depth, rounded to a layer). Default: the official 8/16/24 of 32.
        ratio: ``lambda``, the fraction of visual tokens each stage keeps of the previous one (cumulative
            ``lambda ** i`` at stage ``i``), or a sequence of cumulative fractions, one per stage layer,
            non-increasing (the official ``image_token_ratio_list``). All in (0, 1].
    """

    renumber_positions = True

    def __init__(self, layers: Sequence[int | float] = OFFICIAL_LAYERS, ratio: float | Sequence[float] = 0.5):
        layers = tuple(layers)
        if not layers or not all(_is_number(x) for x in layers):
            raise ValueError(
                f"PyramidDrop: layers must be a non-empty sequence of ints or floats, got {layers!r}"
            )
        for x in layers:
            if isinstance(x, float) and not 0.0 < x < 1.0:
                raise ValueError(f"PyramidDrop: a fractional stage layer must be in (0, 1), got {x}")
            if isinstance(x, int) and x < 1:
                raise ValueError(f"PyramidDrop: stage layers must be >= 1, got {x}")
        if _is_number(ratio):
            ratios = tuple(float(ratio) ** (i + 1) for i in range(len(layers)))
            if not 0.0 < ratio <= 1.0:
                raise ValueError(f"PyramidDrop: ratio (lambda) must be in (0, 1], got {ratio}")
        else:
            ratios = tuple(ratio) if isinstance(ratio, Sequence) and not isinstance(ratio, str) else ()
            if len(ratios) != len(layers) or not all(_is_number(r) and 0.0 < r <= 1.0 for r in ratios):
                raise ValueError(
                    f"PyramidDrop: ratio must be a float in (0, 1] or {len(layers)} cumulative fractions in "
                    f"(0, 1], one per stage layer; got {ratio!r}"
                )
            if any(b > a for a, b in zip(ratios, ratios[1:])):
                raise ValueError(f"PyramidDrop: cumulative ratios must not increase, got {ratios}")
        self.layers, self.ratio, self._ratios = layers, ratio, ratios
        self._stage: dict[int, float] = {}  # stage layer -> cumulative ratio

    def __repr__(self) -> str:
        return f"PyramidDrop(layers={self.layers}, ratio={self.ratio})"

    def check(self, info: ModelInfo) -> None:
        depth = info.num_layers
        resolved = [round(x * depth) if isinstance(x, float) else x for x in self.layers]
        if any(b <= a for a, b in zip(resolved, resolved[1:])) or resolved[0] < 1 or resolved[-1] >= depth:
            raise ValueError(
                f"PyramidDrop: stage layers {self.layers} give {resolved} on a {depth}-layer language "
                f"model; they must be strictly increasing layers in 1..{depth - 1}"
            )
        self._stage = dict(zip(resolved, self._ratios))

    def after_layer(self, layer: int, hidden: torch.Tensor, state: Prefill) -> torch.Tensor | None:
        ratio = self._stage.get(layer + 1)
        if ratio is None:
            return None
        q, k = state.ops.layer_qk(layer + 1, hidden)
        key_ok = state.current(state.real)
        # the last slot is every sample's last prompt token (left padding); it sees every real key
        _, mass = attention_with_key_mass(
            q[:, -1:], k, k, attn_mask=key_ok[:, None, None, :], query_set="last"
        )
        visual = state.current(state.visual)
        total = state.visual.sum(1).tolist()
        counts = torch.tensor([int(n * ratio) for n in total], device=visual.device)
        return ~visual | top_visual(mass, visual, counts)
