"""HiPrune through ``attach`` on tiny random LLaVA-1.5 / LLaVA-NeXT models, against a transcription of the
official ``encode_images`` on the vision tower's own attention maps (``output_attentions``); refused where
the adapters do not record the tower's attention per patch."""

import pytest
import torch

import tests.test_mllm_llava_next as nxt
import tests.test_mllm_more_reducers_families as fam
import tests.test_mllm_qwen2_vl as qw
from tests.test_mllm_tokens import IMG, PATCHES, embed, manual_logits, sample, tiny_inputs, tiny_llava
from visattn.mllm_tokens import HiPrune, attach

SIDE = 4  # the tiny towers' 4 x 4 patch grid (official: 24 hard-coded)


def official_hiprune(shallow, deep, count, alpha, present=None):
    """The official choice for one view from its global attention ``shallow`` / ``deep`` ``[P]``; ``present``
    (LLaVA-NeXT tiles) leaves out the patches that do not reach the prompt. The kept indices, sorted."""
    n = shallow.shape[0]
    present = torch.ones(n, dtype=torch.bool) if present is None else present
    shallow = torch.where(present, shallow, -1.0)
    anchors = torch.topk(shallow[None], k=round(count * alpha / 5), dim=1)[1]
    near = torch.cat([anchors, anchors - 1, anchors + 1, anchors - SIDE, anchors + SIDE], dim=1)
    near = torch.unique(near.clamp(0, n - 1), sorted=False)
    near = near[present[near]][None]
    mask = torch.zeros(1, n, dtype=torch.bool).scatter_(1, near, 1)
    deep = deep - mask.int().squeeze() - 2 * (~present).int()
    registers = torch.topk(deep[None], k=count - near.shape[1], dim=1)[1]
    return torch.sort(torch.cat([near, registers], dim=1), dim=1)[0][0]


@torch.no_grad()
def global_attention(model, pix, object_layer):
    """``(shallow, deep)`` ``[views, P]``: ``attentions[object_layer - 1]`` and ``attentions[-2]``, mean over
    heads, then over queries, [CLS] key dropped (the official ``.mean(dim=1).mean(dim=1)[:, 1:]``)."""
    att = model.model.vision_tower(pix, output_attentions=True).attentions
    return tuple(att[i].mean(dim=1).mean(dim=1)[:, 1:] for i in (object_layer - 1, -2))


def llava_kept(model, sid, spix, count, alpha, object_layer):
    shallow, deep = global_attention(model, spix, object_layer)
    visual = sid[0] == IMG
    kept = ~visual
    for image, slots in enumerate(visual.nonzero()[:, 0].view(-1, PATCHES)):
        kept[slots[official_hiprune(shallow[image], deep[image], count, alpha)]] = True
    return kept.nonzero()[:, 0]


@pytest.mark.parametrize(
    "attn,images,keep,alpha,layer", [("eager", 1, 10, 1.0, 2), ("sdpa", 2, 8, 0.7, 1), ("sdpa", 1, 5, 0.1, 3)]
)
def test_llava_matches_the_official_rule_on_a_hand_shortened_sequence(attn, images, keep, alpha, layer):
    model, eager = tiny_llava(attn), tiny_llava("eager")
    ids, mask, pix = tiny_inputs(images=images)
    reducer = HiPrune(keep=keep, alpha=alpha, object_layer=layer)
    with torch.no_grad(), attach(model, reducer) as handle:
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        positions = handle.output_positions
    for b in range(2):
        sid, spix = sample(ids, mask, pix, b, images)
        kept = llava_kept(eager, sid, spix, keep, alpha, layer)
        ref = manual_logits(eager, embed(eager, sid, spix)[:, kept])
        torch.testing.assert_close(out[b, -ref.shape[1] :], ref[0], atol=1e-5, rtol=1e-4)
        assert handle.stats[b]["kept_per_layer"] == [keep * images] * 4
        pad = int((mask[b] == 0).sum())
        assert positions[b, -kept.numel() :].tolist() == (kept + pad).tolist()


def test_llava_generate_with_cache_matches_cache_free_reference():
    model, eager = tiny_llava("sdpa"), tiny_llava("eager")
    ids, mask, pix = tiny_inputs(images=2, text_after=(5, 3))
    gen = dict(input_ids=ids, attention_mask=mask, pixel_values=pix, max_new_tokens=4, do_sample=False)
    with torch.no_grad(), attach(model, HiPrune(keep=6, alpha=0.9, object_layer=2)):
        cached = model.generate(**gen)[:, ids.shape[1] :]
        uncached = model.generate(**gen, use_cache=False)[:, ids.shape[1] :]
    assert torch.equal(cached, uncached)
    for b in range(2):
        sid, spix = sample(ids, mask, pix, b, images=2)
        kept, tokens = llava_kept(eager, sid, spix, 6, 0.9, 2), sid
        for _ in range(4):
            keep = torch.cat([kept, torch.arange(sid.shape[1], tokens.shape[1])])
            logits = manual_logits(eager, embed(eager, tokens, spix)[:, keep])
            tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
        assert torch.equal(cached[b], tokens[0, sid.shape[1] :])


def next_kept(eager, inputs, b, keep, alpha, layer, new=None):
    """Kept positions of NeXT sample ``b`` alone: every crop by the official rule among the patches that
    reached the prompt (found by feature matching), its budget a fraction of them."""
    ids, pix, sizes = nxt.sample(inputs, b)
    ids = ids if new is None else torch.cat([ids, new], 1)
    embeds, visual, crop, patch = nxt.reference_layout(eager, ids, pix, sizes)
    shallow, deep = global_attention(eager, pix.flatten(0, 1), layer)
    kept = crop < 0
    for c in crop[crop >= 0].unique().tolist():
        slots = (crop == c).nonzero()[:, 0]
        present = torch.zeros(PATCHES, dtype=torch.bool)
        present[patch[slots]] = True
        picks = official_hiprune(shallow[c], deep[c], fam.budget(keep, slots.numel()), alpha, present)
        kept[slots[torch.isin(patch[slots], picks)]] = True
    return embeds, kept.nonzero()[:, 0]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_llava_next_batch_matches_the_rule_on_each_sample_alone(attn):
    model, eager = nxt.tiny_next(attn), nxt.tiny_next("eager")
    inputs = nxt.tiny_inputs(model)
    with torch.no_grad(), attach(model, HiPrune(keep=0.75, alpha=0.8, object_layer=2)) as handle:
        out = model(**inputs).logits
        stats = handle.stats
    for b in range(2):
        embeds, kept = next_kept(eager, inputs, b, 0.75, 0.8, 2)
        ref = manual_logits(eager, embeds[:, kept])
        torch.testing.assert_close(out[b, -ref.shape[1] :], ref[0], atol=1e-5, rtol=1e-4)
        assert stats[b]["kept_per_layer"][0] == sum(round(n * 0.75) for n in nxt.CROP_TOKENS[b])


def test_llava_next_generate_with_cache_matches_cache_free_greedy_rule():
    model, eager = nxt.tiny_next("sdpa"), nxt.tiny_next("eager")
    inputs, steps = nxt.tiny_inputs(model), 3
    start = inputs["input_ids"].shape[1]
    with torch.no_grad(), attach(model, HiPrune(keep=0.5, alpha=0.5, object_layer=2)):
        cached = model.generate(**inputs, max_new_tokens=steps, do_sample=False)[:, start:]
    for b in range(2):
        _, decided = next_kept(eager, inputs, b, 0.5, 0.5, 2)
        new = torch.zeros(1, 0, dtype=torch.long)
        for _ in range(steps):
            embeds, _ = next_kept(eager, inputs, b, 0.5, 0.5, 2, new)
            index = torch.cat([decided, torch.arange(decided.max() + 1, embeds.shape[1])])
            new = torch.cat([new, manual_logits(eager, embeds[:, index])[:, -1:].argmax(-1)], 1)
        assert torch.equal(cached[b], new[0])


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_keep_all_equals_the_unattached_model_and_remove_restores(family):
    if family == "llava":
        model = tiny_llava("sdpa")
        ids, mask, pix = tiny_inputs(images=2)
        inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pix)
    else:
        model = nxt.tiny_next("sdpa")
        inputs = nxt.tiny_inputs(model)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref = model(**inputs).logits
        with attach(model, HiPrune(keep=1.0, object_layer=2)) as handle:
            torch.testing.assert_close(model(**inputs).logits[real], ref[real], atol=1e-5, rtol=0)
            assert all(s["prefill_flops_saved"] == 0 for s in handle.stats)
        with attach(model, HiPrune(keep=0.5, object_layer=2)) as handle:
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
            assert all(s["kept_per_layer"][-1] < s["visual_tokens_in"] for s in handle.stats)
        assert torch.equal(model(**inputs).logits, ref)  # remove() restored the model bit for bit


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl", "qwen2_5_vl"])
def test_refused_where_the_tower_attention_is_not_recorded(family):
    model = qw.tiny_qwen(family) if family == "qwen2_5_vl" else fam.model_of(family)
    with pytest.raises(ValueError, match="HiPrune ranks patches by the vision tower's attention maps"):
        attach(model, HiPrune(keep=0.5, object_layer=1))


def test_invalid_arguments():
    for kwargs in (dict(keep=0), dict(keep=1.5), dict(keep="192"), dict(keep=-4)):
        with pytest.raises(ValueError, match="HiPrune: .*keep"):
            HiPrune(**kwargs)
    for kwargs in (dict(alpha=-0.1), dict(alpha=2.0), dict(alpha="0.1"), dict(object_layer=0)):
        with pytest.raises(ValueError, match="HiPrune: (alpha|object_layer)"):
            HiPrune(**kwargs)
    model = tiny_llava()
    with pytest.raises(ValueError, match="visual tokens per image"):
        attach(model, HiPrune(keep=PATCHES + 1, object_layer=2))
    with pytest.raises(ValueError, match="object_layer=9 is not a layer of the 4-layer"):
        attach(model, HiPrune(keep=4))
    ids, mask, pix = tiny_inputs(images=1)
    # a budget of 3 with alpha 1: one anchor, and its clamped neighbours make 4 or 5 (3 only at patch 0 / 15)
    with (
        pytest.raises(ValueError, match="exceed the budget"),
        attach(model, HiPrune(keep=3, alpha=1.0, object_layer=2)),
    ):
        model(input_ids=ids, attention_mask=mask, pixel_values=pix)
