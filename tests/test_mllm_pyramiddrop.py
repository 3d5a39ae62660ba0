"""PyramidDrop through ``attach`` on a tiny random LLaVA, against an unbatched loop written from the
official ``pdrop_rank_drop`` (stage layer's own projections, last-token row, contiguous positions)."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from tests.test_mllm_tokens import ATTENTION, IMG, embed, sample, tiny_inputs, tiny_llava
from visattn.mllm_tokens import PyramidDrop, attach


def head_mean_attention(lm, layer, hidden, pos):
    """``[n, n]``: causal softmax attention of ``layer`` on its input ``hidden [1, n, d]``, mean over
    heads, computed the official way (input norm, q/k projections, RoPE, full softmax in float32)."""
    attn = lm.layers[layer].self_attn
    h = lm.layers[layer].input_layernorm(hidden)
    n, dim = h.shape[1], attn.head_dim
    q = attn.q_proj(h).view(1, n, -1, dim).transpose(1, 2)
    k = attn.k_proj(h).view(1, n, -1, dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *lm.rotary_emb(h, pos))
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q @ k.transpose(-1, -2) / dim**0.5).masked_fill(
        torch.ones(n, n, dtype=torch.bool).triu(1), -torch.inf
    )
    return torch.softmax(logits, dim=-1, dtype=torch.float32).mean(1)[0]


@torch.no_grad()
def pdrop_reference(model, ids, pix, stages, kept=None):
    """Logits of one unpadded sample; ``stages`` maps a stage layer to its cumulative ratio. Returns
    ``(logits, kept)`` where ``kept[layer]`` are the input positions that layer saw; pass ``kept`` to
    replay those decisions on a longer sequence (cache-free decode: new tokens are always kept)."""
    return pdrop_rule(model, embed(model, ids, pix), ids[0] == IMG, stages, kept)


@torch.no_grad()
def pdrop_rule(model, hidden, visual, stages, kept=None):
    """:func:`pdrop_reference` on the LLM input ``hidden [1, n, D]`` of one unpadded sample whose
    droppable tokens are ``visual [n]``."""
    lm = model.model.language_model
    index = torch.arange(hidden.shape[1])
    decided = {}
    for i, layer in enumerate(lm.layers):
        pos = torch.arange(hidden.shape[1])[None]  # contiguous after every drop (official)
        if i in stages:
            if kept is None:
                score = head_mean_attention(lm, i, hidden, pos)[-1]  # the last prompt token's row
                vis = visual[index]
                count = int(int(visual.sum()) * stages[i])
                top = score.masked_fill(~vis, float("-inf")).topk(count).indices
                keep = ~vis
                keep[top] = True
                slots = keep.nonzero()[:, 0]
            else:
                new = torch.arange(kept[0].numel(), visual.numel())  # layer 0 saw the whole prompt
                slots = torch.cat([kept[i], new])
                slots = torch.searchsorted(index, slots)
            index, hidden = index[slots], hidden[:, slots]
            pos = torch.arange(hidden.shape[1])[None]
        decided[i] = index.clone()
        n = hidden.shape[1]
        mask = torch.full((n, n), torch.finfo(hidden.dtype).min).triu(1)[None, None]
        hidden = layer(
            hidden, attention_mask=mask, position_embeddings=lm.rotary_emb(hidden, pos), position_ids=pos
        )
    return model.lm_head(lm.norm(hidden)), decided


@pytest.mark.parametrize("attn,images", [("eager", 1), ("sdpa", 2), (ATTENTION[2], 2)], indirect=["attn"])
def test_pyramiddrop_matches_official_loop(attn, images):
    model, eager = tiny_llava(attn, layers=5), tiny_llava("eager", layers=5)
    ids, mask, pix = tiny_inputs(images=images)
    reducer = PyramidDrop(layers=(1, 2, 4), ratio=(0.75, 0.5, 0.25))
    with torch.no_grad(), attach(model, reducer) as handle:
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        stats = handle.stats
    n = 16 * images
    for b in range(2):
        sid, spix = sample(ids, mask, pix, b, images)
        ref, _ = pdrop_reference(eager, sid, spix, {1: 0.75, 2: 0.5, 4: 0.25})
        torch.testing.assert_close(out[b, -ref.shape[1] :], ref[0], atol=1e-5, rtol=1e-4)
        assert stats[b]["kept_per_layer"] == [n, int(n * 0.75), n // 2, n // 2, n // 4]


def test_pyramiddrop_default_layers_are_official_fractions():
    model = tiny_llava(layers=8)
    with attach(model, PyramidDrop()) as handle:
        assert handle.reducer._stage == {2: 0.5, 4: 0.25, 6: 0.125}
    with attach(tiny_llava(layers=32), PyramidDrop()) as handle:  # LLaVA-1.5-7B's depth
        assert handle.reducer._stage == {8: 0.5, 16: 0.25, 24: 0.125}


@pytest.mark.parametrize("attn", ATTENTION, indirect=True)
def test_pyramiddrop_generate_with_cache_matches_cache_free_reference(attn):
    model, eager = tiny_llava(attn, layers=5), tiny_llava("eager", layers=5)
    ids, mask, pix = tiny_inputs(images=1, text_after=(5, 3))
    stages = {1: 0.5, 3: 0.25}
    gen = dict(input_ids=ids, attention_mask=mask, pixel_values=pix, max_new_tokens=4, do_sample=False)
    with torch.no_grad(), attach(model, PyramidDrop(layers=(1, 3), ratio=0.5)):
        out = model.generate(**gen, return_dict_in_generate=True, output_logits=True)
    cached = out.sequences[:, ids.shape[1] :]
    for b in range(2):
        sid, spix = sample(ids, mask, pix, b)
        _, kept = pdrop_reference(eager, sid, spix, stages)
        tokens = sid
        for step in range(4):
            logits, _ = pdrop_reference(eager, tokens, spix, stages, kept=kept)
            # the decode steps' logits too: they see the shifted positions of the reduced layers
            torch.testing.assert_close(out.logits[step][b], logits[0, -1], atol=1e-5, rtol=1e-4)
            tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
        assert torch.equal(cached[b], tokens[0, sid.shape[1] :])


@pytest.mark.parametrize("attn", ATTENTION, indirect=True)
def test_pyramiddrop_ratio_one_is_identity_and_remove_restores(attn):
    model = tiny_llava(attn)
    ids, mask, pix = tiny_inputs(images=2)
    real = mask.bool()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        gen = dict(input_ids=ids, attention_mask=mask, pixel_values=pix, max_new_tokens=3, do_sample=False)
        ref_gen = model.generate(**gen)
        with attach(model, PyramidDrop(ratio=1.0)) as handle:
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
            assert handle.stats[0]["prefill_flops_saved"] == 0
            assert torch.equal(model.generate(**gen), ref_gen)
        torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=0)
        with attach(model, PyramidDrop(layers=(1, 2))):
            model.generate(**gen)
        assert torch.equal(model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits, ref)


def test_pyramiddrop_invalid_arguments():
    model = tiny_llava()
    for kwargs, match in (
        (dict(ratio=0.0), "lambda"),
        (dict(ratio=1.5), "lambda"),
        (dict(ratio=(0.5, 0.25)), "cumulative"),
        (dict(layers=(1, 2), ratio=(0.25, 0.5)), "increase"),
        (dict(layers=(1.0,)), "fractional"),
        (dict(layers=(0, 2)), ">= 1"),
        (dict(layers=()), "non-empty"),
    ):
        with pytest.raises(ValueError, match=match):
            PyramidDrop(**kwargs)
    for layers in ((1, 4), (2, 2), (3, 1)):
        with pytest.raises(ValueError, match="strictly increasing"):
            attach(model, PyramidDrop(layers=layers))
