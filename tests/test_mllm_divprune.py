"""DivPrune through ``attach`` on a tiny random LLaVA, against a loop written from the official code."""

import pytest
import torch

from tests.test_mllm_tokens import (
    ATTENTION,
    IMG,
    PATCHES,
    embed,
    manual_logits,
    sample,
    tiny_inputs,
    tiny_llava,
)
from visattn.mllm_tokens import DivPrune, attach
from visattn.mllm_tokens.divprune import max_min_diverse


def official_divprune(tokens: torch.Tensor, count: int) -> torch.Tensor:
    """The official greedy loop on one image's ``[N, D]`` tokens: picked indices in pick order."""
    unit = tokens / tokens.norm(dim=1, keepdim=True)
    dist = 1.0 - unit @ unit.t()
    picks = []
    for i in range(count):
        if i == 0:
            scores = dist.topk(2, dim=0, largest=False).values[1]
        else:
            scores = dist[torch.tensor(picks)].min(0).values
        picks.append(int(scores.argmax()))
    return torch.tensor(picks)


def divprune_keep(model, sid, spix, count):
    """Kept positions of one unpadded sample by the official rule, each image on its own."""
    emb = embed(model, sid, spix)[0]
    visual = (sid[0] == IMG).nonzero()[:, 0]
    kept = (sid[0] != IMG).clone()
    for image in visual.view(-1, PATCHES):
        kept[image[official_divprune(emb[image], count)]] = True
    return kept.nonzero()[:, 0]


def test_max_min_diverse_matches_official_loop_and_picks_distinct_tokens():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 40, 16, generator=g, dtype=torch.float64)
    picks = max_min_diverse(feats, 12)
    for i in range(3):
        assert picks[i].tolist() == official_divprune(feats[i], 12).tolist()
    # exact duplicates: the official loop may repeat a pick; ours never does
    dup = torch.cat([feats[:1, :3]] * 4, dim=1)  # 12 vectors, 3 distinct
    picks = max_min_diverse(dup, 12)
    assert picks.unique().numel() == 12


@pytest.mark.parametrize("attn,images", [("eager", 1), ("sdpa", 2), (ATTENTION[2], 2)], indirect=["attn"])
def test_divprune_matches_official_rule_on_hand_shortened_sequence(attn, images):
    model, eager = tiny_llava(attn), tiny_llava("eager")
    ids, mask, pix = tiny_inputs(images=images)
    with torch.no_grad(), attach(model, DivPrune(keep=5)) as handle:
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        positions = handle.output_positions
    for b in range(2):
        sid, spix = sample(ids, mask, pix, b, images)
        kept = divprune_keep(eager, sid, spix, 5)
        ref = manual_logits(eager, embed(eager, sid, spix)[:, kept])  # contiguous positions
        torch.testing.assert_close(out[b, -ref.shape[1] :], ref[0], atol=1e-5, rtol=1e-4)
        assert handle.stats[b]["kept_per_layer"] == [5 * images] * 4
        pad = int((mask[b] == 0).sum())
        assert positions[b, -kept.numel() :].tolist() == (kept + pad).tolist()


@pytest.mark.parametrize("attn", ATTENTION, indirect=True)
def test_divprune_keep_all_is_identity_and_remove_restores(attn):
    model = tiny_llava(attn)
    ids, mask, pix = tiny_inputs(images=2)
    real = mask.bool()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        with attach(model, DivPrune(keep=1.0)) as handle:
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
            assert handle.stats[0]["prefill_flops_saved"] == 0
        torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=0)
        with attach(model, DivPrune(keep=3)):
            model.generate(input_ids=ids, attention_mask=mask, pixel_values=pix, max_new_tokens=2)
        assert torch.equal(model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits, ref)


def test_divprune_generate_with_cache_matches_cache_free_reference():
    model, eager = tiny_llava("sdpa"), tiny_llava("eager")
    ids, mask, pix = tiny_inputs(images=2, text_after=(5, 3))
    gen = dict(input_ids=ids, attention_mask=mask, pixel_values=pix, max_new_tokens=4, do_sample=False)
    with torch.no_grad(), attach(model, DivPrune(keep=4)):
        cached = model.generate(**gen)[:, ids.shape[1] :]
        uncached = model.generate(**gen, use_cache=False)[:, ids.shape[1] :]
    assert torch.equal(cached, uncached)
    for b in range(2):
        sid, spix = sample(ids, mask, pix, b, images=2)
        kept = divprune_keep(eager, sid, spix, 4)
        tokens = sid
        for _ in range(4):
            keep = torch.cat([kept, torch.arange(sid.shape[1], tokens.shape[1])])
            logits = manual_logits(eager, embed(eager, tokens, spix)[:, keep])
            tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
        assert torch.equal(cached[b], tokens[0, sid.shape[1] :])


def test_divprune_invalid_arguments():
    model = tiny_llava()
    for bad in (0, 1.5, 0.0, "56", True):
        with pytest.raises(ValueError, match="DivPrune"):
            DivPrune(keep=bad)
    with pytest.raises(ValueError, match="visual tokens per image"):
        attach(model, DivPrune(keep=PATCHES + 1))
