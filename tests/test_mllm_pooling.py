"""Pooling through ``attach`` on tiny random LLaVA-1.5 / LLaVA-NeXT models, against the official
``adaptive_avg_pool2d`` of each image's token grid (UniPruneBench's ``Pool_PreLLM``) and, for NeXT's
unpadded tiles, a per-window loop; refused on the families whose units have no square patch grid."""

import pytest
import torch
import torch.nn.functional as F

import tests.test_mllm_llava_next as nxt
from tests.test_mllm_random import (
    LLAVA_IMAGES,
    batch_of,
    cached_generation,
    check_no_op_and_restore,
    model_of,
    view,
)
from tests.test_mllm_tokens import PATCHES, manual_logits
from visattn.mllm_tokens import Pooling, attach
from visattn.mllm_tokens.pooling import pool_windows

SIDE = 4  # the tiny towers' 4 x 4 patch grid


def official_pool(tokens: torch.Tensor, kernel: int) -> torch.Tensor:
    """UniPruneBench's pooling of one view's ``[side * side, D]`` tokens to ``(side / kernel)^2``."""
    grid = tokens.t().reshape(1, -1, SIDE, SIDE)
    out = SIDE // kernel
    return F.adaptive_avg_pool2d(grid, (out, out)).reshape(-1, out * out).t()


@torch.no_grad()
def llava_pooled(eager, inputs, b, kernel, new=None):
    """LLM input of LLaVA-1.5 sample ``b`` alone: each image's tokens replaced by the official pooling."""
    embeds, unit, _ = view("llava", eager, inputs, b, new)
    parts, at = [], 0
    for u in range(LLAVA_IMAGES[b]):
        slots = (unit == u).nonzero()[:, 0]
        parts += [embeds[0, at : slots[0]], official_pool(embeds[0, slots], kernel)]
        at = int(slots[-1]) + 1
    return torch.cat([*parts, embeds[0, at:]])[None]


@torch.no_grad()
def next_pooled(eager, inputs, b, kernel, new=None):
    """LLM input of LLaVA-NeXT sample ``b`` alone: every crop's windows (on its full grid) averaged over
    the tokens that reached the prompt, each at its first token's slot; newlines and text as they are."""
    ids, pix, sizes = nxt.sample(inputs, b)
    ids = ids if new is None else torch.cat([ids, new], 1)
    embeds, _, crop, patch = nxt.reference_layout(eager, ids, pix, sizes)
    window = [(int(c), int(p) // SIDE // kernel, int(p) % SIDE // kernel) for c, p in zip(crop, patch)]
    out, seen = [], set()
    for i, key in enumerate(window):
        if crop[i] < 0:
            out.append(embeds[0, i])
        elif key not in seen:
            seen.add(key)
            members = [j for j, other in enumerate(window) if other == key and crop[j] >= 0]
            out.append(embeds[0, members].mean(0))
    return torch.stack(out)[None]


PROMPTS = {"llava": llava_pooled, "llava_next": next_pooled}


def test_windows_of_full_grids_are_the_official_adaptive_pool():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2 * PATCHES, 8, generator=g)  # two images, prompt order = raster order
    unit, patch = torch.arange(2 * PATCHES) // PATCHES, torch.arange(2 * PATCHES) % PATCHES
    window, first = pool_windows(unit, patch, SIDE, 2)
    means = torch.zeros(8, 8).index_add_(0, window, tokens) / torch.bincount(window)[:, None]
    official = torch.cat([official_pool(tokens[:PATCHES], 2), official_pool(tokens[PATCHES:], 2)])
    # the window means in the order of their first tokens, which are the windows' top-left patches
    torch.testing.assert_close(means[window[first]], official)
    assert first.nonzero()[:, 0].tolist() == [0, 2, 8, 10, 16, 18, 24, 26]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", sorted(PROMPTS))
def test_batch_matches_the_official_pooling_on_each_sample_alone(family, attn):
    model, eager = model_of(family, attn), model_of(family, "eager")
    inputs = batch_of(family, model)
    with torch.no_grad(), attach(model, Pooling(kernel=2)) as handle:
        out = model(**inputs).logits
        stats = handle.stats
    for b in range(2):
        ref = manual_logits(eager, PROMPTS[family](eager, inputs, b, 2))  # contiguous positions
        torch.testing.assert_close(out[b, -ref.shape[1] :], ref[0], atol=1e-5, rtol=1e-4)
    if family == "llava":
        assert [s["kept_per_layer"] for s in stats] == [[8] * 4, [4] * 4]  # 4 windows per image
    else:  # full crops keep 4 windows, tiles that lost half their rows 2
        assert [s["kept_per_layer"][0] for s in stats] == [4 + 4 * 2, 5 * 4 + 4 + 4 * 2]


@pytest.mark.parametrize("family", sorted(PROMPTS))
def test_generate_with_cache_matches_cache_free_greedy_rule(family):
    steps = 3
    eager, inputs, cached = cached_generation(family, Pooling(tokens=4), steps)
    words = eager.get_input_embeddings()
    for b in range(2):
        prompt = PROMPTS[family](eager, inputs, b, 2)
        new = torch.zeros(1, 0, dtype=torch.long)
        for _ in range(steps):
            logits = manual_logits(eager, torch.cat([prompt, words(new)], 1))
            new = torch.cat([new, logits[:, -1:].argmax(-1)], 1)
        assert torch.equal(cached[b], new[0])


@pytest.mark.parametrize("family", sorted(PROMPTS))
def test_one_token_windows_equal_the_unattached_model_and_remove_restores(family):
    stats = check_no_op_and_restore(family, Pooling(kernel=1), Pooling(kernel=4))
    assert all(s["prefill_flops_saved"] > 0 for s in stats)


@pytest.mark.parametrize("tokens,kept", [(4, 4), (6, 4), (10, 16), (1, 1), (16, 16)])
def test_a_token_budget_picks_the_nearest_dividing_window(tokens, kept):
    model = model_of("llava")
    inputs = batch_of("llava", model)
    with torch.no_grad(), attach(model, Pooling(tokens=tokens)) as handle:
        model(**inputs)
    assert handle.stats[1]["kept_per_layer"][0] == kept  # sample 1: one 4 x 4 image


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl", "qwen2_5_vl"])
def test_refused_without_a_square_patch_grid(family):
    with pytest.raises(ValueError, match="square patch grid"):
        attach(model_of(family), Pooling())


def test_invalid_arguments():
    model = model_of("llava")
    bad = ({"kernel": 0}, {"kernel": 1.5}, {"kernel": True}, {"tokens": 0}, {"kernel": 3, "tokens": 4})
    for kwargs in bad:
        with pytest.raises(ValueError, match="Pooling"):
            Pooling(**kwargs)
    with pytest.raises(ValueError, match=r"3 x 3 windows do not divide the 4 x 4 patch grid"):
        attach(model, Pooling(kernel=3))
    with pytest.raises(ValueError, match="exceeds the 16 visual tokens"):
        attach(model, Pooling(tokens=17))
