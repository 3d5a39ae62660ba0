"""Random pruning: the baseline the pruning benchmarks compare every method with (UniPruneBench, Peng et
al. 2025, TianfanPeng/VLMUniPruneBench ``methods/Random_PreLLM.py`` and ``custom_qwenvl.py``; also
LightCompress's ``RandomPrune``).

Before the language model, each image keeps a uniformly drawn subset of its visual tokens
(``torch.randperm(n)[:count]``, as the official code draws them); the kept tokens stay in prompt order
and the shortened sequence gets the positions every pre-LLM reducer gets (contiguous on LLaVA-style
models; the original M-RoPE ids on Qwen2-VL, as the official Qwen2.5-VL code's ``position_ids[:, :,
keep_idx]``). Official budget: a ratio of the tokens (``KEEP_RATIO``, default 0.5), truncated,
``int(n * ratio)``, at least one token (the InternVL path's ``max(1, ...)``).

Seeding: the official code draws from the global RNG; here every sample draws from its own
``torch.Generator`` seeded with ``seed``, image after image in prompt order, so a prompt keeps the same
tokens whatever else is in the batch, in every cache-free re-run and on every device.

Differences: the official Qwen2.5-VL code draws once over all the sample's image tokens and the InternVL
code once over the base view and once over all tiles together, concatenating the draws in permutation
order; here every image (LLaVA-NeXT: every crop) is drawn on its own and kept tokens keep their order.
"""

from __future__ import annotations

import torch

from visattn.mllm_tokens._core import ModelInfo, Prefill, Reducer
from visattn.mllm_tokens.fastv import keep_budgets, keep_count


def random_choice(sizes: list[int], counts: list[int], seed: int) -> list[torch.Tensor]:
    """Uniform choice for one sample's images: image ``i`` of ``sizes[i]`` tokens keeps ``counts[i]`` of
    them. One CPU generator seeded with ``seed`` draws ``randperm(sizes[i])[:counts[i]]`` image after
    image. Returns ``[counts[i]]`` long tensors of ascending indices."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=g)[:c].sort().values for n, c in zip(sizes, counts)]


class Random(Reducer):
    """Keep a seeded uniform random subset of every image's visual tokens, before the language model.

    Args:
        keep: kept tokens per image: a fraction in (0, 1] (official ``KEEP_RATIO``, default 0.5;
            ``int(n * keep)``, at least 1) or an int count (per ``ModelInfo.patches_per_image`` tokens as
            for the other reducers; on models without a common image size, per image, and an image with
            fewer tokens is a ``ValueError``).
        seed: int >= 0; the same seed keeps the same tokens of the same prompt.
    """

    def __init__(self, keep: int | float = 0.5, seed: int = 0):
        keep_count(keep, 1 << 30, "Random")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"Random: seed must be an int >= 0, got {seed!r}")
        self.keep, self.seed = keep, seed
        self._patches = 0

    def __repr__(self) -> str:
        return f"Random(keep={self.keep}, seed={self.seed})"

    def check(self, info: ModelInfo) -> None:
        keep_count(self.keep, info.patches_per_image or 1 << 30, "Random")
        self._patches = info.patches_per_image

    def budgets(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[images]`` kept tokens of images with ``tokens [images]`` visual tokens each."""
        if isinstance(self.keep, float):
            kept = (tokens.double() * self.keep).floor().clamp_min(1).long()
            return torch.where(tokens > 0, kept, 0)
        if self._patches == 0 and bool((tokens < self.keep).any()):
            raise ValueError(
                f"Random: keep={self.keep} exceeds the {int(tokens.min())} visual tokens of an image in "
                "this prompt (images differ in size here: give a fraction)"
            )
        return keep_budgets(self.keep, tokens, self._patches)

    def pre_llm(self, state: Prefill) -> torch.Tensor | None:
        counts = self.budgets(state.image_tokens).tolist()
        keep = ~state.visual
        first = 0
        for b, images in enumerate(state.images_per_sample.tolist()):
            units = range(first, first + images)
            slots = [(state.image_id[b] == u).nonzero()[:, 0] for u in units]  # each in prompt order
            picks = random_choice([s.numel() for s in slots], [counts[u] for u in units], self.seed)
            for s, p in zip(slots, picks):
                keep[b, s[p.to(s.device)]] = True
            first += images
        return keep
