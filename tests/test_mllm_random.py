"""Random through ``attach`` on the tiny random models of every family, against the official draw
(``torch.randperm(n)[:int(n * ratio)]`` per image, UniPruneBench) applied to each sample alone."""

import pytest
import torch

import tests.test_mllm_llava_next as nxt
import tests.test_mllm_more_reducers_families as fam
import tests.test_mllm_qwen2_vl as qw
from tests.test_mllm_tokens import IMG, PATCHES, embed, manual_logits, tiny_llava
from visattn.mllm_tokens import Random, attach
from visattn.mllm_tokens.random_prune import random_choice

FAMILIES = ["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"]


def model_of(family, attn="sdpa"):
    if family == "llava":
        return tiny_llava(attn)
    if family == "qwen2_5_vl":
        return qw.tiny_qwen("qwen2_5_vl", attn)
    return fam.model_of(family, attn)


LLAVA_IMAGES = [2, 1]  # images per sample of the LLaVA-1.5 batch


def batch_of(family, model):
    """The left-padded batch of 2 with different image counts (see the families battery)."""
    if family != "llava":
        return fam.batch_of("qwen2_vl" if family == "qwen2_5_vl" else family, model)
    g = torch.Generator().manual_seed(1)
    rows = []
    for b, images in enumerate(LLAVA_IMAGES):
        row = [1] + torch.randint(2, 100, (3,), generator=g).tolist()
        for _ in range(images):
            row += [IMG] * PATCHES + torch.randint(2, 100, (2,), generator=g).tolist()
        rows.append(row + torch.randint(2, 100, (5 - 2 * b,), generator=g).tolist())
    return dict(nxt.left_pad(rows), pixel_values=torch.randn(sum(LLAVA_IMAGES), 3, 32, 32, generator=g))


@torch.no_grad()
def check_no_op_and_restore(family, no_op, reducing):
    """``no_op`` attached gives the unattached model's logits on the real tokens and saves no FLOPs;
    ``reducing`` generates with the cache and returns its ``handle.stats``; after both are removed the
    model's logits are bit for bit the unattached ones."""
    model = model_of(family)
    inputs = batch_of(family, model)
    real = inputs["attention_mask"].bool()
    ref = model(**inputs).logits
    with attach(model, no_op) as handle:
        torch.testing.assert_close(model(**inputs).logits[real], ref[real], atol=1e-5, rtol=0)
        assert all(s["prefill_flops_saved"] == 0 for s in handle.stats)
    with attach(model, reducing) as handle:
        model.generate(**inputs, max_new_tokens=2)
        stats = handle.stats
    assert torch.equal(model(**inputs).logits, ref)
    return stats


@torch.no_grad()
def cached_generation(family, reducer, steps):
    """Greedy ``generate`` of the batch with ``reducer`` attached, checked equal to the cache-free run;
    returns ``(eager model, inputs, new tokens [2, steps])`` for a per-sample reference of the rule."""
    model, eager = model_of(family), model_of(family, "eager")
    inputs = batch_of(family, model)
    gen = dict(inputs, max_new_tokens=steps, do_sample=False)
    with attach(model, reducer):
        cached = model.generate(**gen)
        assert torch.equal(cached, model.generate(**gen, use_cache=False))
    return eager, inputs, cached[:, inputs["input_ids"].shape[1] :]


@torch.no_grad()
def view(family, eager, inputs, b, new=None):
    """Sample ``b`` alone: ``(embeds [1, L, D], unit [L], positions)`` (see the families battery)."""
    if family != "llava":
        return fam.view("qwen2_vl" if family == "qwen2_5_vl" else family, eager, inputs, b, new)
    ids = inputs["input_ids"][b : b + 1, inputs["attention_mask"][b].bool()]
    first = sum(LLAVA_IMAGES[:b])
    pix = inputs["pixel_values"][first : first + LLAVA_IMAGES[b]]
    ids = ids if new is None else torch.cat([ids, new], 1)
    return embed(eager, ids, pix), fam.chunks(ids[0] == IMG, [PATCHES] * len(pix)), None


def count_of(family, keep, n):
    """Kept tokens of a unit of ``n``: ``int(n * keep)`` (at least 1) for a fraction; an int keep per
    16-token view, scaled (LLaVA-style; ``keep_budgets``), or per image on Qwen2-VL."""
    if isinstance(keep, float):
        return max(1, int(n * keep))
    return keep if family.startswith("qwen") else max(1, round(keep * n / PATCHES))


def official_kept(family, unit, keep, seed):
    """The official draw, image after image of the sample, from a generator seeded with ``seed``:
    ``randperm(n)[:count]``; kept positions ascending."""
    g = torch.Generator().manual_seed(seed)
    kept = unit < 0
    for u in unit[unit >= 0].unique().tolist():
        slots = (unit == u).nonzero()[:, 0]
        n = slots.numel()
        kept[slots[torch.randperm(n, generator=g)[: count_of(family, keep, n)]]] = True
    return kept.nonzero()[:, 0]


def kept_logits(family, eager, embeds, pos, kept):
    """Logits of the sequence shortened before the LLM (contiguous positions, or Qwen's own M-RoPE ids)."""
    index = torch.cat([kept, torch.arange(kept.max() + 1, embeds.shape[1])])
    if pos is None:
        return manual_logits(eager, embeds[:, index])
    return qw.manual_logits(eager, embeds, pos, index)


def test_random_choice_is_the_official_draw_seeded_and_uniform():
    sizes, counts = [10, 7, 3], [5, 2, 3]
    picks = random_choice(sizes, counts, seed=3)
    with torch.random.fork_rng():
        torch.manual_seed(3)  # the official code draws from the global generator
        official = [torch.randperm(n)[:c].sort().values for n, c in zip(sizes, counts)]
    assert [p.tolist() for p in picks] == [o.tolist() for o in official]
    assert [p.tolist() for p in random_choice(sizes, counts, seed=3)] == [p.tolist() for p in picks]
    assert random_choice(sizes, counts, seed=4)[0].tolist() != picks[0].tolist()
    # uniform: over 2000 seeds every one of 10 tokens is kept about half of the time
    freq = torch.zeros(10)
    for seed in range(2000):
        freq[random_choice([10], [5], seed)[0]] += 1
    assert bool(((freq / 2000 - 0.5).abs() < 0.05).all()), freq


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family,keep", [(f, 0.5) for f in FAMILIES] + [("llava_next", 3), ("qwen2_vl", 2)])
def test_batch_matches_the_official_draw_on_each_sample_alone(family, keep, attn):
    model, eager = model_of(family, attn), model_of(family, "eager")
    inputs = batch_of(family, model)
    with torch.no_grad(), attach(model, Random(keep=keep, seed=5)) as handle:
        out = model(**inputs).logits
        stats = handle.stats
    for b in range(2):
        embeds, unit, pos = view(family, eager, inputs, b)
        kept = official_kept(family, unit, keep, 5)
        ref = kept_logits(family, eager, embeds, pos, kept)
        torch.testing.assert_close(out[b, -ref.shape[1] :], ref[0], atol=1e-5, rtol=1e-4)
        assert stats[b]["visual_tokens_in"] == int((unit >= 0).sum())
        assert stats[b]["kept_per_layer"] == [int((unit[kept] >= 0).sum())] * 4


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_cache_matches_cache_free_greedy_rule(family):
    steps = 3  # the same draw at every cache-free step
    eager, inputs, cached = cached_generation(family, Random(keep=0.5, seed=2), steps)
    for b in range(2):
        embeds, unit, pos = view(family, eager, inputs, b)
        kept = official_kept(family, unit, 0.5, 2)
        new = torch.zeros(1, 0, dtype=torch.long)
        for _ in range(steps):
            embeds, unit, pos = view(family, eager, inputs, b, new)
            new = torch.cat([new, kept_logits(family, eager, embeds, pos, kept)[:, -1:].argmax(-1)], 1)
        assert torch.equal(cached[b], new[0]), (b, cached[b], new[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_equals_the_unattached_model_and_remove_restores(family):
    stats = check_no_op_and_restore(family, Random(keep=1.0), Random(keep=0.25, seed=1))
    assert all(s["prefill_flops_saved"] > 0 for s in stats)


def test_invalid_arguments():
    for bad in (-1, 1.5, True, "0"):
        with pytest.raises(ValueError, match="Random: seed"):
            Random(seed=bad)
    for bad in (0, 0.0, 1.5, "half", True):
        with pytest.raises(ValueError, match="Random: .*keep"):
            Random(keep=bad)
    with pytest.raises(ValueError, match="visual tokens per image"):
        attach(tiny_llava(), Random(keep=PATCHES + 1))
    model = model_of("qwen2_vl")
    inputs = batch_of("qwen2_vl", model)  # images of 6, 4 and 6 tokens
    with pytest.raises(ValueError, match="exceeds the 4 visual tokens"), attach(model, Random(keep=5)):
        model(**inputs)
