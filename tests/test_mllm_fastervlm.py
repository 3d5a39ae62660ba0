"""FasterVLM through ``attach`` on tiny random LLaVA-1.5 / LLaVA-NeXT models, against a transcription of
the official ``encode_images`` (head-mean [CLS] row of ``attentions[-2]`` from the eager CLIP tower,
``topk`` per crop, NeXT's unpadding of the index masks) on each sample alone; refused without a [CLS]."""

import pytest
import torch

import tests.test_mllm_llava_next as nxt
from tests.test_mllm_random import (
    LLAVA_IMAGES,
    batch_of,
    cached_generation,
    check_no_op_and_restore,
    kept_logits,
    model_of,
    view,
)
from tests.test_mllm_tokens import PATCHES
from visattn.mllm_tokens import FasterVLM, attach


@torch.no_grad()
def official_kept(family, eager, inputs, b, keep, layer=-2):
    """``(embeds [1, L, D], kept positions)`` of sample ``b`` alone by the official rule."""
    if family == "llava":
        embeds, unit, _ = view(family, eager, inputs, b)
        first = sum(LLAVA_IMAGES[:b])
        pix = inputs["pixel_values"][first : first + LLAVA_IMAGES[b]]
        patch = torch.where(unit >= 0, (unit >= 0).cumsum(0) - 1 - unit * PATCHES, -1)
    else:
        ids, pix, sizes = nxt.sample(inputs, b)
        embeds, _, unit, patch = nxt.reference_layout(eager, ids, pix, sizes)
        pix = pix.flatten(0, 1)
    attentions = eager.model.vision_tower(pix, output_attentions=True).attentions[layer]
    score = attentions.mean(1)[:, 0, 1:]  # [crops, P]: the [CLS] row over the patches, head mean
    chosen = torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.topk(keep, dim=1).indices, True)
    kept = unit < 0
    kept[unit >= 0] = chosen[unit[unit >= 0], patch[unit >= 0]]  # the unpadded tiles' surviving picks
    return embeds, kept.nonzero()[:, 0]


FAMILIES = ["llava", "llava_next"]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family,keep", [("llava", 5), ("llava_next", 5), ("llava_next", 0.5)])
def test_batch_matches_the_official_rule_on_each_sample_alone(family, keep, attn):
    model, eager = model_of(family, attn), model_of(family, "eager")
    inputs = batch_of(family, model)
    with torch.no_grad(), attach(model, FasterVLM(keep=keep)) as handle:
        out = model(**inputs).logits
        stats = handle.stats
    count = keep if isinstance(keep, int) else round(PATCHES * keep)
    for b in range(2):
        embeds, kept = official_kept(family, eager, inputs, b, count)
        ref = kept_logits(family, eager, embeds, None, kept)
        torch.testing.assert_close(out[b, -ref.shape[1] :], ref[0], atol=1e-5, rtol=1e-4)
        if family == "llava":
            assert stats[b]["kept_per_layer"] == [count * LLAVA_IMAGES[b]] * 4
        else:  # each crop picks `count` of its 16 patches; the half tiles keep the picks that survive
            assert count <= stats[b]["kept_per_layer"][0] < count * len(nxt.CROP_TOKENS[b])


def test_an_earlier_layer_ranks_by_its_own_cls_row():
    model, eager = model_of("llava"), model_of("llava", "eager")
    inputs = batch_of("llava", model)
    with torch.no_grad(), attach(model, FasterVLM(keep=3, layer=1)):
        out = model(**inputs).logits
    for b in range(2):
        embeds, kept = official_kept("llava", eager, inputs, b, 3, layer=1)
        ref = kept_logits("llava", eager, embeds, None, kept)
        torch.testing.assert_close(out[b, -ref.shape[1] :], ref[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_cache_matches_cache_free_greedy_rule(family):
    steps = 3
    eager, inputs, cached = cached_generation(family, FasterVLM(keep=4), steps)
    for b in range(2):
        _, kept = official_kept(family, eager, inputs, b, 4)
        new = torch.zeros(1, 0, dtype=torch.long)
        for _ in range(steps):
            embeds, _, _ = view(family, eager, inputs, b, new)
            new = torch.cat([new, kept_logits(family, eager, embeds, None, kept)[:, -1:].argmax(-1)], 1)
        assert torch.equal(cached[b], new[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_equals_the_unattached_model_and_remove_restores(family):
    stats = check_no_op_and_restore(family, FasterVLM(keep=1.0), FasterVLM(keep=2))
    assert all(s["prefill_flops_saved"] > 0 for s in stats)


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl", "qwen2_5_vl"])
def test_refused_without_a_vision_cls_token(family):
    with pytest.raises(ValueError, match=r"FasterVLM ranks patches by the vision tower's \[CLS\] attention"):
        attach(model_of(family), FasterVLM(keep=4))


def test_invalid_arguments():
    for kwargs in ({"keep": 0}, {"keep": 1.5}, {"keep": True}, {"layer": 1.0}, {"layer": None}):
        with pytest.raises(ValueError, match="FasterVLM"):
            FasterVLM(**kwargs)
    model = model_of("llava")
    with pytest.raises(ValueError, match="visual tokens per image"):
        attach(model, FasterVLM(keep=PATCHES + 1))
    with pytest.raises(ValueError, match="outside the 4-layer vision encoder"):
        attach(model, FasterVLM(layer=4))
