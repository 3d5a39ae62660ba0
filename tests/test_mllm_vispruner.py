"""VisPruner through ``attach`` on tiny random LLaVA-1.5 / LLaVA-NeXT models, against a transcription of the
official ``encode_images`` on the vision tower's own attention maps (``output_attentions``); refused on the
towers without a [CLS] token."""

import pytest
import torch

import tests.test_mllm_llava_next as nxt
import tests.test_mllm_more_reducers_families as fam
import tests.test_mllm_qwen2_vl as qw
from tests.test_mllm_tokens import IMG, PATCHES, embed, manual_logits, sample, tiny_inputs, tiny_llava
from visattn.mllm_tokens import VisPruner, attach
from visattn.mllm_tokens.vispruner import vispruner_select


def official_batched(attn, feats, count, ratio=0.5):
    """The official loop verbatim in shape (batch ``B``, even list lengths): the kept indices, sorted."""
    b = attn.shape[0]
    important_num = int(count * ratio)
    diverse = count - important_num
    order = attn.argsort(dim=-1, descending=True)
    important, residual = order[:, :important_num], order[:, important_num:]
    normed = feats / feats.norm(dim=-1, keepdim=True)
    while diverse > 0:
        r_len = residual.shape[1]
        r = min(8, r_len - diverse)
        if r <= 0:
            break
        tokens = normed[torch.arange(b).unsqueeze(-1).expand(-1, r_len), residual]
        scores = (tokens[..., ::2, :] @ tokens[..., 1::2, :].transpose(-1, -2)).max(dim=-1).values
        distinct = scores.argsort(dim=-1, descending=True)[:, r:]
        rows = torch.arange(b).unsqueeze(-1).expand(-1, r_len // 2 - r)
        residual = torch.cat([residual[..., ::2][rows, distinct], residual[..., 1::2]], dim=-1)
    selected = torch.cat([important, residual], dim=-1) if diverse > 0 else important
    return selected.sort(dim=-1).values


def official_one(attn, feats, count, ratio=0.5):
    """The same rule for one image ``attn [N]``, ``feats [N, C]`` at any length (odd lists too)."""
    important_num = int(count * ratio)
    diverse = count - important_num
    order = attn.argsort(descending=True)
    important, residual = order[:important_num], order[important_num:]
    normed = feats / feats.norm(dim=-1, keepdim=True)
    while diverse > 0:
        r = min(8, residual.numel() - diverse)
        if r <= 0:
            break
        tokens = normed[residual]
        scores = (tokens[::2] @ tokens[1::2].t()).max(dim=-1).values
        residual = torch.cat([residual[::2][scores.argsort(descending=True)[r:]], residual[1::2]])
    return (torch.cat([important, residual]) if diverse > 0 else important).sort().values


@pytest.mark.parametrize("keep", [64, 128, 192])
def test_select_matches_the_official_loop_at_the_official_budgets(keep):
    g = torch.Generator().manual_seed(keep)
    attn, feats = torch.rand(2, 576, generator=g), torch.randn(2, 576, 32, generator=g)
    picks = vispruner_select(attn, feats, keep // 2, keep - keep // 2)
    assert torch.equal(picks.sort(dim=1).values, official_batched(attn, feats, keep))
    for i in range(2):
        assert torch.equal(official_one(attn[i], feats[i], keep), official_batched(attn, feats, keep)[i])


@torch.no_grad()
def tower_cues(model, pix):
    """``(attn [views, P], feats [views, P, C])``: the [CLS] row of ``attentions[-2]`` (mean over heads)
    and ``hidden_states[-2]`` without [CLS], from the eager tower."""
    out = model.model.vision_tower(pix, output_hidden_states=True, output_attentions=True)
    return out.attentions[-2][:, :, 0, 1:].mean(1), out.hidden_states[-2][:, 1:]


def llava_kept(model, sid, spix, count, ratio=0.5):
    attn, feats = tower_cues(model, spix)
    visual = sid[0] == IMG
    kept = ~visual
    for image, slots in enumerate(visual.nonzero()[:, 0].view(-1, PATCHES)):
        kept[slots[official_one(attn[image], feats[image], count, ratio)]] = True
    return kept.nonzero()[:, 0]


@pytest.mark.parametrize(
    "attn,images,keep,ratio", [("eager", 1, 5, 0.5), ("sdpa", 2, 7, 0.3), ("sdpa", 1, 4, 1.0)]
)
def test_llava_matches_the_official_rule_on_a_hand_shortened_sequence(attn, images, keep, ratio):
    model, eager = tiny_llava(attn), tiny_llava("eager")
    ids, mask, pix = tiny_inputs(images=images)
    with torch.no_grad(), attach(model, VisPruner(keep=keep, important_ratio=ratio)) as handle:
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        positions = handle.output_positions
    for b in range(2):
        sid, spix = sample(ids, mask, pix, b, images)
        kept = llava_kept(eager, sid, spix, keep, ratio)
        ref = manual_logits(eager, embed(eager, sid, spix)[:, kept])
        torch.testing.assert_close(out[b, -ref.shape[1] :], ref[0], atol=1e-5, rtol=1e-4)
        assert handle.stats[b]["kept_per_layer"] == [keep * images] * 4
        pad = int((mask[b] == 0).sum())
        assert positions[b, -kept.numel() :].tolist() == (kept + pad).tolist()


def test_llava_generate_with_cache_matches_cache_free_reference():
    model, eager = tiny_llava("sdpa"), tiny_llava("eager")
    ids, mask, pix = tiny_inputs(images=2, text_after=(5, 3))
    gen = dict(input_ids=ids, attention_mask=mask, pixel_values=pix, max_new_tokens=4, do_sample=False)
    with torch.no_grad(), attach(model, VisPruner(keep=6)):
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


# ------------------------------------------------------------------------------------------ LLaVA-NeXT
def next_kept(eager, inputs, b, keep, new=None):
    """Kept positions of NeXT sample ``b`` alone: every crop by the official rule over the patches that
    reached the prompt (found by feature matching), its budget a fraction of them."""
    ids, pix, sizes = nxt.sample(inputs, b)
    if new is not None:
        ids = torch.cat([ids, new], 1)
    embeds, visual, crop, patch = nxt.reference_layout(eager, ids, pix, sizes)
    attn, feats = tower_cues(eager, pix.flatten(0, 1))
    kept = crop < 0
    for c in crop[crop >= 0].unique().tolist():
        slots = (crop == c).nonzero()[:, 0]
        p = patch[slots]
        kept[slots[official_one(attn[c, p], feats[c, p], fam.budget(keep, slots.numel()))]] = True
    return embeds, kept.nonzero()[:, 0]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_llava_next_batch_matches_the_rule_on_each_sample_alone(attn):
    model, eager = nxt.tiny_next(attn), nxt.tiny_next("eager")
    inputs = nxt.tiny_inputs(model)
    with torch.no_grad(), attach(model, VisPruner(keep=0.5)) as handle:
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
    with torch.no_grad(), attach(model, VisPruner(keep=0.5)):
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
        with attach(model, VisPruner(keep=1.0)) as handle:
            torch.testing.assert_close(model(**inputs).logits[real], ref[real], atol=1e-5, rtol=0)
            assert all(s["prefill_flops_saved"] == 0 for s in handle.stats)
        with attach(model, VisPruner(keep=0.5)) as handle:
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
            assert all(s["kept_per_layer"][-1] < s["visual_tokens_in"] for s in handle.stats)
        assert torch.equal(model(**inputs).logits, ref)  # remove() restored the model bit for bit


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl", "qwen2_5_vl"])
def test_refused_on_towers_without_a_cls_token(family):
    model = qw.tiny_qwen(family) if family == "qwen2_5_vl" else fam.model_of(family)
    with pytest.raises(ValueError, match=r"VisPruner ranks patches by the vision tower's \[CLS\] attention"):
        attach(model, VisPruner(keep=0.5))


def test_invalid_arguments():
    for bad in (0, -1, 1.5, 0.0, "64", True):
        with pytest.raises(ValueError, match="VisPruner: .*keep"):
            VisPruner(keep=bad)
    for bad in (-0.1, 1.5, "half", None, True):
        with pytest.raises(ValueError, match="VisPruner: important_ratio"):
            VisPruner(important_ratio=bad)
    with pytest.raises(ValueError, match="visual tokens per image"):
        attach(tiny_llava(), VisPruner(keep=PATCHES + 1))
