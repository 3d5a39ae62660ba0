"""DART through ``attach`` on a tiny random LLaVA, against an unbatched loop written from the official
``get_retained_image_token`` (pivots walked in ascending position instead of Python set order)."""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from tests.test_mllm_tokens import (
    ATTENTION,
    IMG,
    PATCHES,
    _greedy_reference,
    embed,
    manual_logits,
    sample,
    tiny_inputs,
    tiny_llava,
)
from visattn.mllm_tokens import DART, attach


@torch.no_grad()
def dart_keep(model, ids, pix, layer, keep, p_img, p_txt):
    """Kept positions of one unpadded sample by the official rule (keys and outputs of layer K-1)."""
    visual = ids[0] == IMG
    return dart_rule(
        model, embed(model, ids, pix), visual, int(visual.sum()) // PATCHES, layer, keep, p_img, p_txt
    )


@torch.no_grad()
def dart_rule(model, hidden, visual, images, layer, keep, p_img, p_txt):
    """DART's kept positions on one unpadded sample: LLM input ``hidden [1, n, D]``, ``visual [n]`` the
    tokens it may drop (of ``images`` images), positions ``0..n-1``."""
    lm = model.model.language_model
    n = hidden.shape[1]
    pos = torch.arange(n)[None]
    pe = lm.rotary_emb(hidden, pos)
    mask = torch.full((n, n), torch.finfo(hidden.dtype).min).triu(1)[None, None]
    for i in range(layer):
        if i == layer - 1:  # keys of layer K-1 after RoPE, heads concatenated
            attn, h = lm.layers[i].self_attn, lm.layers[i].input_layernorm(hidden)
            k = attn.k_proj(h).view(1, n, -1, attn.head_dim).transpose(1, 2)
            _, k = apply_rotary_pos_emb(k, k, *pe)
            keys = k.transpose(1, 2).reshape(n, -1)
        hidden = lm.layers[i](hidden, attention_mask=mask, position_embeddings=pe, position_ids=pos)
    top = (keep * images) // (p_img + p_txt)
    return official_selection(keys, lm.norm(hidden)[0], visual.nonzero()[:, 0], top, p_img, p_txt)


def official_selection(keys, state, visual, top, p_img, p_txt):
    """``get_retained_image_token`` on one sample: the positions kept (every non-visual one and the chosen
    visual ones, sorted). ``keys [n, H x D]`` (after RoPE), ``state [n, D]`` (final-normed), ``visual``
    the visual positions; text pivots come from the tokens after the last visual one; ``top`` tokens per
    pivot."""
    n = keys.shape[0]
    after = int(visual[-1]) + 1
    norms = keys.abs().sum(-1)
    image_piv = visual[norms[visual].topk(p_img).indices].tolist()
    n_txt = min(p_txt, n - after)
    text_piv = (norms[after:].topk(n_txt).indices + after).tolist()
    chosen = set(image_piv + text_piv)
    pool = set(visual.tolist()) - set(image_piv)
    for item in sorted(chosen):
        cand = sorted(pool)
        sim = -F.cosine_similarity(state[item], state[cand], dim=-1)
        picked = [cand[i] for i in sim.topk(min(top, len(cand))).indices.tolist()]
        chosen.update(picked)
        pool.difference_update(picked)
    chosen.difference_update(text_piv)
    kept = torch.ones(n, dtype=torch.bool)
    kept[visual] = False
    kept[torch.tensor(sorted(chosen), dtype=torch.long)] = True
    assert int(kept.sum()) == n - visual.numel() + min(visual.numel(), p_img + (p_img + n_txt) * top)
    return kept.nonzero()[:, 0]


@pytest.mark.parametrize("attn,images", [("eager", 1), ("sdpa", 2), (ATTENTION[2], 2)], indirect=["attn"])
def test_dart_matches_official_rule(attn, images):
    model, eager = tiny_llava(attn), tiny_llava("eager")
    ids, mask, pix = tiny_inputs(images=images, text_after=(5, 0))  # 7 and 2 tokens after the image
    # key norms depend on absolute positions (RoPE): number the left-padded rows from their first token
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad(), attach(model, DART(layer=2, keep=8, pivots_image=2, pivots_text=4)) as handle:
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pix, position_ids=pos).logits
        stats = handle.stats
    for b in range(2):
        sid, spix = sample(ids, mask, pix, b, images)
        kept = dart_keep(eager, sid, spix, 2, 8, 2, 4)
        ref = manual_logits(eager, embed(eager, sid, spix), kept, from_layer=2)  # original positions
        torch.testing.assert_close(out[b, -ref.shape[1] :], ref[0], atol=1e-5, rtol=1e-4)
        n_txt = (4, 2)[b]  # the second sample has only 2 text candidates
        expected = 2 + (2 + n_txt) * (8 * images // 6)
        assert stats[b]["kept_per_layer"] == [PATCHES * images] * 2 + [expected] * 2


@pytest.mark.parametrize("attn", ATTENTION, indirect=True)
def test_dart_generate_with_cache_matches_cache_free_reference(attn):
    model, eager = tiny_llava(attn), tiny_llava("eager")
    ids, mask, pix = tiny_inputs()
    gen = dict(input_ids=ids, attention_mask=mask, pixel_values=pix, max_new_tokens=4, do_sample=False)
    with torch.no_grad(), attach(model, DART(layer=1, keep=8, pivots_image=2, pivots_text=2)):
        cached = model.generate(**gen)[:, ids.shape[1] :]
    for b in range(2):
        sid, spix = sample(ids, mask, pix, b)
        kept = dart_keep(eager, sid, spix, 1, 8, 2, 2)
        assert torch.equal(cached[b], _greedy_reference(eager, sid, spix, kept, 1, 4))


@pytest.mark.parametrize("attn", ATTENTION, indirect=True)
def test_dart_full_budget_is_identity_and_remove_restores(attn):
    model = tiny_llava(attn)
    ids, mask, pix = tiny_inputs()
    real = mask.bool()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        # one image pivot and 15 tokens for the only pivot: the whole image of 16 tokens
        with attach(model, DART(keep=PATCHES - 1, pivots_image=1, pivots_text=0)) as handle:
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
            assert handle.stats[0]["prefill_flops_saved"] == 0
        torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=0)
        with attach(model, DART(keep=8, pivots_image=2, pivots_text=2)):
            model.generate(input_ids=ids, attention_mask=mask, pixel_values=pix, max_new_tokens=2)
        assert torch.equal(model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits, ref)


def test_dart_invalid_arguments():
    model = tiny_llava()
    for kwargs, match in (
        (dict(layer=0), "layer"),
        (dict(keep=0), "keep"),
        (dict(pivots_image=0), "pivots_image"),
        (dict(pivots_text=-1), "pivots_text"),
        (dict(keep=7, pivots_image=4, pivots_text=4), "no token per pivot"),
    ):
        with pytest.raises(ValueError, match=match):
            DART(**kwargs)
    with pytest.raises(ValueError, match="outside"):
        attach(model, DART(layer=4, keep=8))
    with pytest.raises(ValueError, match="visual tokens per image"):
        attach(model, DART(keep=PATCHES, pivots_image=1, pivots_text=1))
