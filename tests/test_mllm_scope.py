"""SCOPE through ``attach`` on tiny random LLaVA-1.5 / LLaVA-NeXT models, against a transcription of the
official ``CLIPVisionTower_SCOPE.forward`` / ``SCOPE`` on the vision tower's own attention maps
(``output_attentions``); refused on the towers without a [CLS] token."""

import pytest
import torch

import tests.test_mllm_llava_next as nxt
import tests.test_mllm_more_reducers_families as fam
import tests.test_mllm_qwen2_vl as qw
from tests.test_mllm_tokens import IMG, PATCHES, embed, manual_logits, sample, tiny_inputs, tiny_llava
from visattn.mllm_tokens import SCOPE, attach
from visattn.mllm_tokens.scope import scope_select


def official_scope(feats, count, cls_attn, alpha=1.0):
    """The official batched greedy loop (``COMBINED='multi'``): ``feats [B, N, D]``, ``cls_attn [B, N]``;
    the picked indices in pick order ``[B, count]``."""
    norm = feats / feats.norm(dim=-1, keepdim=True)
    sim = torch.bmm(norm, norm.transpose(1, 2))
    b, n = feats.shape[:2]
    selected = torch.zeros(b, n, dtype=torch.bool)
    selected_idx = torch.empty(b, count, dtype=torch.long)
    cur_max = torch.zeros(b, n, dtype=feats.dtype)
    powered = cls_attn**alpha
    for i in range(count):
        unselected = ~selected
        gains = torch.maximum(
            torch.zeros(1, dtype=feats.dtype),
            sim.masked_fill(~unselected.unsqueeze(1), 0) - cur_max.unsqueeze(2),
        ).sum(dim=1)
        gains = (gains * powered).masked_fill(~unselected, float("-inf"))
        best = gains.argmax(dim=1)
        selected[torch.arange(b), best] = True
        selected_idx[:, i] = best
        cur_max = torch.maximum(cur_max, sim[torch.arange(b), best])
    return selected_idx


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
def test_select_matches_the_official_loop(alpha):
    g = torch.Generator().manual_seed(3)
    feats, attn = torch.randn(2, 576, 32, generator=g), torch.rand(2, 576, generator=g)
    assert torch.equal(scope_select(attn, feats, 64, alpha), official_scope(feats, 64, attn, alpha))


@torch.no_grad()
def tower_cues(model, pix):
    """``(cls_attention_sum [views, P], features [views, P, C])`` as the official code takes them:
    ``attentions[-2][:, :, 0, 1:]`` summed over heads and ``hidden_states[-2]`` without [CLS]."""
    out = model.model.vision_tower(pix, output_hidden_states=True, output_attentions=True)
    return out.attentions[-2][:, :, 0, 1:].sum(dim=1), out.hidden_states[-2][:, 1:]


def llava_kept(model, sid, spix, count, alpha=1.0):
    attn, feats = tower_cues(model, spix)
    picks = official_scope(feats, count, attn, alpha)  # one batch of the sample's images
    visual = sid[0] == IMG
    kept = ~visual
    for image, slots in enumerate(visual.nonzero()[:, 0].view(-1, PATCHES)):
        kept[slots[picks[image]]] = True
    return kept.nonzero()[:, 0]


@pytest.mark.parametrize("attn,images,keep,alpha", [("eager", 1, 5, 1.0), ("sdpa", 2, 7, 2.0)])
def test_llava_matches_the_official_rule_on_a_hand_shortened_sequence(attn, images, keep, alpha):
    model, eager = tiny_llava(attn), tiny_llava("eager")
    ids, mask, pix = tiny_inputs(images=images)
    with torch.no_grad(), attach(model, SCOPE(keep=keep, alpha=alpha)) as handle:
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        positions = handle.output_positions
    for b in range(2):
        sid, spix = sample(ids, mask, pix, b, images)
        kept = llava_kept(eager, sid, spix, keep, alpha)
        ref = manual_logits(eager, embed(eager, sid, spix)[:, kept])
        torch.testing.assert_close(out[b, -ref.shape[1] :], ref[0], atol=1e-5, rtol=1e-4)
        assert handle.stats[b]["kept_per_layer"] == [keep * images] * 4
        pad = int((mask[b] == 0).sum())
        assert positions[b, -kept.numel() :].tolist() == (kept + pad).tolist()


def test_llava_generate_with_cache_matches_cache_free_reference():
    model, eager = tiny_llava("sdpa"), tiny_llava("eager")
    ids, mask, pix = tiny_inputs(images=2, text_after=(5, 3))
    gen = dict(input_ids=ids, attention_mask=mask, pixel_values=pix, max_new_tokens=4, do_sample=False)
    with torch.no_grad(), attach(model, SCOPE(keep=6)):
        cached = model.generate(**gen)[:, ids.shape[1] :]
        uncached = model.generate(**gen, use_cache=False)[:, ids.shape[1] :]
    assert torch.equal(cached, uncached)
    for b in range(2):
        sid, spix = sample(ids, mask, pix, b, images=2)
        kept, tokens = llava_kept(eager, sid, spix, 6), sid
        for _ in range(4):
            keep = torch.cat([kept, torch.arange(sid.shape[1], tokens.shape[1])])
            logits = manual_logits(eager, embed(eager, tokens, spix)[:, keep])
            tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
        assert torch.equal(cached[b], tokens[0, sid.shape[1] :])


def next_kept(eager, inputs, b, keep, new=None):
    """Kept positions of NeXT sample ``b`` alone: every crop by the official loop over the patches that
    reached the prompt (found by feature matching), its budget a fraction of them."""
    ids, pix, sizes = nxt.sample(inputs, b)
    ids = ids if new is None else torch.cat([ids, new], 1)
    embeds, visual, crop, patch = nxt.reference_layout(eager, ids, pix, sizes)
    attn, feats = tower_cues(eager, pix.flatten(0, 1))
    kept = crop < 0
    for c in crop[crop >= 0].unique().tolist():
        slots = (crop == c).nonzero()[:, 0]
        p = patch[slots]
        picks = official_scope(feats[c, p][None], fam.budget(keep, slots.numel()), attn[c, p][None])[0]
        kept[slots[picks]] = True
    return embeds, kept.nonzero()[:, 0]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_llava_next_batch_matches_the_rule_on_each_sample_alone(attn):
    model, eager = nxt.tiny_next(attn), nxt.tiny_next("eager")
    inputs = nxt.tiny_inputs(model)
    with torch.no_grad(), attach(model, SCOPE(keep=0.5)) as handle:
        out = model(**inputs).logits
        stats = handle.stats
    for b in range(2):
        embeds, kept = next_kept(eager, inputs, b, 0.5)
        ref = manual_logits(eager, embeds[:, kept])
        torch.testing.assert_close(out[b, -ref.shape[1] :], ref[0], atol=1e-5, rtol=1e-4)
        assert stats[b]["kept_per_layer"][0] == sum(round(n * 0.5) for n in nxt.CROP_TOKENS[b])


def test_llava_next_generate_with_cache_matches_cache_free_greedy_rule():
    model, eager = nxt.tiny_next("sdpa"), nxt.tiny_next("eager")
    inputs, steps = nxt.tiny_inputs(model), 3
    start = inputs["input_ids"].shape[1]
    with torch.no_grad(), attach(model, SCOPE(keep=0.5)):
        cached = model.generate(**inputs, max_new_tokens=steps, do_sample=False)[:, start:]
    for b in range(2):
        _, decided = next_kept(eager, inputs, b, 0.5)
        new = torch.zeros(1, 0, dtype=torch.long)
        for _ in range(steps):
            embeds, _ = next_kept(eager, inputs, b, 0.5, new)
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
        with attach(model, SCOPE(keep=1.0)) as handle:
            torch.testing.assert_close(model(**inputs).logits[real], ref[real], atol=1e-5, rtol=0)
            assert all(s["prefill_flops_saved"] == 0 for s in handle.stats)
        with attach(model, SCOPE(keep=0.5)) as handle:
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
            assert all(s["kept_per_layer"][-1] < s["visual_tokens_in"] for s in handle.stats)
        assert torch.equal(model(**inputs).logits, ref)  # remove() restored the model bit for bit


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl", "qwen2_5_vl"])
def test_refused_on_towers_without_a_cls_token(family):
    model = qw.tiny_qwen(family) if family == "qwen2_5_vl" else fam.model_of(family)
    with pytest.raises(ValueError, match=r"SCOPE ranks patches by the vision tower's \[CLS\] attention"):
        attach(model, SCOPE(keep=0.5))


def test_invalid_arguments():
    for bad in (0, -1, 1.5, 0.0, "64", True):
        with pytest.raises(ValueError, match="SCOPE: .*keep"):
            SCOPE(keep=bad)
    for bad in (-1.0, "1", None, True, float("nan")):
        with pytest.raises(ValueError, match="SCOPE: alpha"):
            SCOPE(alpha=bad)
    with pytest.raises(ValueError, match="visual tokens per image"):
        attach(tiny_llava(), SCOPE(keep=PATCHES + 1))
