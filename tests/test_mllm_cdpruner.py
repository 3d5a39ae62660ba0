"""CDPruner through ``attach`` on the tiny random models of every family, against a transcription of the
official ``encode_images`` loop (relevance from the prompt's text embeddings, see the module docstring)."""

import pytest
import torch

import tests.test_mllm_more_reducers_families as fam
import tests.test_mllm_qwen2_vl as qw
from tests.test_mllm_tokens import IMG, PATCHES, embed, manual_logits, sample, tiny_inputs, tiny_llava
from visattn.mllm_tokens import CDPruner, attach
from visattn.mllm_tokens.cdpruner import conditional_kernel, dpp_greedy_map


def official_cdpruner(features: torch.Tensor, text: torch.Tensor, count: int) -> torch.Tensor:
    """The official selection for one image (batch 1): ``features [N, D]`` (projector outputs), ``text
    [M, D]`` (the instruction's embeddings); the picked indices, sorted."""
    image = (features / features.norm(dim=-1, keepdim=True)).float()
    similarity = image @ image.t()
    words = (text / text.norm(dim=-1, keepdim=True)).float()
    relevance = (-(image @ words.t())).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance[:, None] * similarity * relevance[None, :]
    n = kernel.shape[0]
    cis = torch.zeros(count, n)
    di2s = torch.diagonal(kernel).clone()
    picked = []
    for i in range(count):
        j = int(torch.argmax(di2s))
        picked.append(j)
        eis = (kernel[j] - cis[:i, j] @ cis[:i]) / torch.sqrt(di2s[j])
        cis[i] = eis
        di2s -= torch.square(eis)
        di2s[j] = -float("inf")
    return torch.tensor(sorted(picked))


def test_kernel_and_greedy_map_match_the_official_loop():
    g = torch.Generator().manual_seed(0)
    feats, text = torch.randn(3, 40, 24, generator=g), torch.randn(3, 7, 24, generator=g)
    text_ok = torch.ones(3, 7, dtype=torch.bool)
    text_ok[1, 5:] = False  # a shorter instruction: the padded rows must not count
    picks = dpp_greedy_map(conditional_kernel(feats, text, text_ok), 12)
    for i in range(3):
        expected = official_cdpruner(feats[i], text[i][text_ok[i]], 12)
        assert picks[i].sort().values.tolist() == expected.tolist()
    assert all(row.unique().numel() == 12 for row in picks)


def llava_kept(model, sid, spix, count):
    """Kept positions of one unpadded LLaVA-1.5 sample by the official rule, image by image."""
    emb = embed(model, sid, spix)[0]
    visual = sid[0] == IMG
    kept = ~visual
    for image in visual.nonzero()[:, 0].view(-1, PATCHES):
        kept[image[official_cdpruner(emb[image], emb[~visual], count)]] = True
    return kept.nonzero()[:, 0]


@pytest.mark.parametrize("attn,images", [("eager", 1), ("sdpa", 2)])
def test_llava_matches_the_official_rule_on_a_hand_shortened_sequence(attn, images):
    model, eager = tiny_llava(attn), tiny_llava("eager")
    ids, mask, pix = tiny_inputs(images=images)
    with torch.no_grad(), attach(model, CDPruner(keep=5)) as handle:
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        positions = handle.output_positions
    for b in range(2):
        sid, spix = sample(ids, mask, pix, b, images)
        kept = llava_kept(eager, sid, spix, 5)
        ref = manual_logits(eager, embed(eager, sid, spix)[:, kept])  # contiguous positions
        torch.testing.assert_close(out[b, -ref.shape[1] :], ref[0], atol=1e-5, rtol=1e-4)
        assert handle.stats[b]["kept_per_layer"] == [5 * images] * 4
        pad = int((mask[b] == 0).sum())
        assert positions[b, -kept.numel() :].tolist() == (kept + pad).tolist()


def test_llava_generate_with_cache_matches_cache_free_reference():
    model, eager = tiny_llava("sdpa"), tiny_llava("eager")
    ids, mask, pix = tiny_inputs(images=2, text_after=(5, 3))
    gen = dict(input_ids=ids, attention_mask=mask, pixel_values=pix, max_new_tokens=4, do_sample=False)
    with torch.no_grad(), attach(model, CDPruner(keep=4)):
        cached = model.generate(**gen)[:, ids.shape[1] :]
    for b in range(2):
        sid, spix = sample(ids, mask, pix, b, images=2)
        kept, tokens = llava_kept(eager, sid, spix, 4), sid
        for _ in range(4):
            keep = torch.cat([kept, torch.arange(sid.shape[1], tokens.shape[1])])
            logits = manual_logits(eager, embed(eager, tokens, spix)[:, keep])
            tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
        assert torch.equal(cached[b], tokens[0, sid.shape[1] :])


# ------------------------------------------------------------------- the other families, batch of 2
FAMILIES = ["llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"]


def model_of(family, attn="sdpa"):
    return qw.tiny_qwen(family, attn) if family == "qwen2_5_vl" else fam.model_of(family, attn)


def family_kept(eager, embeds, unit, keep):
    """Kept positions of one sample alone: each unit by the official rule, conditioned on the sample's
    text tokens (not a unit's token and not a row-end newline)."""
    text = unit < 0
    newline = getattr(eager.model, "image_newline", None)
    if newline is not None:
        text &= ~(embeds[0] == newline).all(-1)
    kept = unit < 0
    for u in unit[unit >= 0].unique().tolist():
        slots = (unit == u).nonzero()[:, 0]
        picks = official_cdpruner(embeds[0, slots], embeds[0, text], fam.budget(keep, slots.numel()))
        kept[slots[picks]] = True
    return kept.nonzero()[:, 0]


def cdpruner_rule(keep):
    # the kept tokens' positions: contiguous on LLaVA-style models, M-RoPE ids on Qwen (as DivPrune)
    return fam.Rule(
        CDPruner(keep=keep),
        lambda eager, embeds, unit, pos: family_kept(eager, embeds, unit, keep),
        fam.divprune_rule(keep).logits,
    )


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family,keep", [(f, 0.5) for f in FAMILIES] + [("qwen2_vl", 3)])
def test_batch_matches_the_rule_on_each_sample_alone(family, keep, attn):
    model, eager = model_of(family, attn), model_of(family, "eager")
    inputs, rule = fam.batch_of(family, model), cdpruner_rule(keep)
    with torch.no_grad(), attach(model, rule.reducer) as handle:
        out = model(**inputs).logits
        stats = handle.stats
    for b in range(2):
        embeds, unit, pos = fam.view(family, eager, inputs, b)
        ref = rule.logits(eager, embeds, unit, pos, rule.prompt(eager, embeds, unit, pos))
        torch.testing.assert_close(out[b, -ref.shape[1] :], ref[0], atol=1e-5, rtol=1e-4)
        assert stats[b]["visual_tokens_in"] == int((unit >= 0).sum())
        assert stats[b]["kept_per_layer"][-1] < stats[b]["visual_tokens_in"]


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_cache_matches_cache_free_greedy_rule(family):
    model, eager = model_of(family, "sdpa"), model_of(family, "eager")
    inputs, rule, steps = fam.batch_of(family, model), cdpruner_rule(0.5), 3
    start = inputs["input_ids"].shape[1]
    with torch.no_grad(), attach(model, rule.reducer):
        cached = model.generate(**inputs, max_new_tokens=steps, do_sample=False)[:, start:]
    # the reference decides on the prompt and decodes cache-free (generate(use_cache=False) would
    # re-run the reducer with the generated tokens as part of the instruction)
    for b in range(2):
        embeds, unit, pos = fam.view(family, eager, inputs, b)
        decided = rule.prompt(eager, embeds, unit, pos)
        new = torch.zeros(1, 0, dtype=torch.long)
        for _ in range(steps):
            embeds, unit, pos = fam.view(family, eager, inputs, b, new)
            logits = rule.logits(eager, embeds, unit, pos, decided)
            new = torch.cat([new, logits[:, -1:].argmax(-1)], 1)
        assert torch.equal(cached[b], new[0]), (b, cached[b], new[0])


@pytest.mark.parametrize("family", ["llava"] + FAMILIES)
def test_keep_all_equals_the_unattached_model_and_remove_restores(family):
    if family == "llava":
        model = tiny_llava("sdpa")
        ids, mask, pix = tiny_inputs(images=2)
        inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pix)
    else:
        model = model_of(family)
        inputs = fam.batch_of(family, model)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref = model(**inputs).logits
        with attach(model, CDPruner(keep=1.0)) as handle:
            torch.testing.assert_close(model(**inputs).logits[real], ref[real], atol=1e-5, rtol=0)
            assert all(s["prefill_flops_saved"] == 0 for s in handle.stats)
        with attach(model, CDPruner(keep=0.5)) as handle:
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
            assert all(s["kept_per_layer"][-1] < s["visual_tokens_in"] for s in handle.stats)
        assert torch.equal(model(**inputs).logits, ref)  # remove() restored the model bit for bit


def test_invalid_arguments():
    for bad in (0, -3, 1.5, 0.0, "64", True, None):
        with pytest.raises(ValueError, match="CDPruner: .*keep"):
            CDPruner(keep=bad)
    model = tiny_llava()
    with pytest.raises(ValueError, match="visual tokens per image"):
        attach(model, CDPruner(keep=PATCHES + 1))
    info = attach(model, CDPruner(keep=1)).info
    info.patches_per_image = 576  # a LLaVA-1.5 image on a 64-wide language model
    for keep in (65, 0.5):
        with pytest.raises(ValueError, match="rank of the DPP kernel"):
            CDPruner(keep=keep).check(info)
    model = tiny_llava()
    ids, _, pix = tiny_inputs(batch=1, images=1)
    ids = torch.full((1, PATCHES), IMG)  # an image and no text to condition on
    with pytest.raises(ValueError, match="no text tokens"), attach(model, CDPruner(keep=4)):
        model(input_ids=ids, pixel_values=pix)
