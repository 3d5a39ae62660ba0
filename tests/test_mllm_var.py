"""VAR through ``attach`` on a tiny random LLaVA with deliberately planted sinks."""

import pytest
import torch

from tests.test_mllm_tokens import ATTENTION, IMG, PATCHES, embed, sample, tiny_inputs, tiny_llava
from visattn.kernels.reference.visual_sink_attention import redistribute
from visattn.mllm_tokens import VAR, attach, calibrate_sink_dims
from visattn.mllm_tokens.var import sink_scores

DIMS = (3, 7)
SINK_PATCHES = (2, 9)
TAU = 4.0  # hidden size 64 caps phi at sqrt(64) = 8, far below the official 20


def plant_sinks(model):
    """Massive activations on DIMS: in BOS's embedding and in two patches of every image."""
    with torch.no_grad():
        model.get_input_embeddings().weight[1, list(DIMS)] = 60.0

    def hook(module, args, output):
        output = output.clone()
        for p in SINK_PATCHES:
            output[:, p, DIMS[p % 2]] = 80.0
        return output

    return model.model.multi_modal_projector.register_forward_hook(hook)


def redistributed(probs, hidden, visual, var, dims=DIMS):
    """VAR's reference rule on one layer's probabilities ``[1, H, N, N]``, with the sinks found on the
    layer's input ``hidden [1, N, D]`` (``visual [1, N]``: the image tokens)."""
    sink = sink_scores(hidden, dims) > var.tau
    category = (
        torch.where(visual, 3, 0) - torch.where(sink & visual, 1, 0) + torch.where(sink & ~visual, 1, 0)
    )
    queries = (visual.cumsum(1) > 0) & ~visual & bool((category == 2).any())
    return redistribute(probs, category, queries, var.fraction, var.rho, var.min_image_attention)


@torch.no_grad()
def var_reference(model, ids, pix, var):
    """Unbatched reference: eager LLaMA layers, with layer-2 attention probabilities redistributed by
    the reference rule from sinks found on the layer's input."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    lm = model.model.language_model
    hidden = embed(model, ids, pix)
    n = hidden.shape[1]
    pos = torch.arange(n)[None]
    pe = lm.rotary_emb(hidden, pos)
    visual = ids == IMG
    for i, layer in enumerate(lm.layers):
        x = layer.input_layernorm(hidden)
        attn = layer.self_attn
        shape = (1, n, -1, attn.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *pe)
        k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        s = (q @ k.transpose(-1, -2)) * attn.scaling
        probs = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        if i in range(2, len(lm.layers) - 1):
            probs = redistributed(probs, hidden, visual, var)
        out = (probs @ v).transpose(1, 2).reshape(1, n, -1)
        hidden = hidden + attn.o_proj(out)
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return model.lm_head(lm.norm(hidden))


@pytest.mark.parametrize("attn", ATTENTION, indirect=True)
def test_var_matches_reference_and_fraction_zero_is_identity(attn):
    model = tiny_llava(attn)
    plant_sinks(model)
    ids, mask, pix = tiny_inputs()
    real = mask.bool()
    var = VAR(sink_dims=DIMS, tau=TAU, min_image_attention=0.05)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        with attach(model, VAR(sink_dims=DIMS, tau=TAU, fraction=0.0, min_image_attention=0.05)):
            same = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        with attach(model, var) as handle:
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
            category = var.sinks(handle._adapter.state)[2]
            assert handle.stats[0]["prefill_flops_saved"] == 0
    torch.testing.assert_close(same[real], ref[real], atol=1e-5, rtol=0)
    assert not torch.allclose(out[real], ref[real], atol=1e-3)
    for b in range(2):
        image_start = int((ids[b] == IMG).nonzero()[0])
        assert sorted((category[b] == 2).nonzero()[:, 0].tolist()) == [image_start + p for p in SINK_PATCHES]
        assert int((ids[b][category[b] == 1] == 1).sum()) == 1  # BOS is a text sink
        sid, spix = sample(ids, mask, pix, b)
        expected = var_reference(model, sid, spix, var)
        torch.testing.assert_close(out[b, real[b]], expected[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attn", ATTENTION, indirect=True)
def test_var_two_images_per_prompt_matches_reference(attn):
    # the text between the two images already follows an image: its rows are redistributed queries
    model = tiny_llava(attn)
    plant_sinks(model)
    ids, mask, pix = tiny_inputs(images=2)
    real = mask.bool()
    var = VAR(sink_dims=DIMS, tau=TAU, min_image_attention=0.05)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        with attach(model, var) as handle:
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
            category = var.sinks(handle._adapter.state)[2]
    assert not torch.allclose(out[real], ref[real], atol=1e-3)
    for b in range(2):
        image_tokens = (ids[b] == IMG).nonzero()[:, 0]
        starts = [int(image_tokens[0]), int(image_tokens[PATCHES])]
        expected_sinks = sorted(start + p for start in starts for p in SINK_PATCHES)
        assert sorted((category[b] == 2).nonzero()[:, 0].tolist()) == expected_sinks
        sid, spix = sample(ids, mask, pix, b, images=2)
        expected = var_reference(model, sid, spix, var)
        torch.testing.assert_close(out[b, real[b]], expected[0], atol=1e-5, rtol=1e-4)


def test_var_generate_with_cache_matches_cache_free():
    model = tiny_llava("sdpa")
    plant_sinks(model)
    ids, mask, pix = tiny_inputs()
    gen = dict(input_ids=ids, attention_mask=mask, pixel_values=pix, max_new_tokens=4, do_sample=False)
    with torch.no_grad(), attach(model, VAR(sink_dims=DIMS, tau=TAU, min_image_attention=0.05)):
        cached = model.generate(**gen)
        uncached = model.generate(**gen, use_cache=False)
    assert torch.equal(cached, uncached)


def test_calibrate_sink_dims_and_validation():
    model = tiny_llava()
    plant_sinks(model)
    ids, mask, pix = tiny_inputs()
    assert calibrate_sink_dims(model, input_ids=ids, attention_mask=mask, pixel_values=pix) == DIMS
    with pytest.raises(ValueError, match="known sink"):
        attach(model, VAR())
    with pytest.raises(ValueError, match="hidden size"):
        attach(model, VAR(sink_dims=(64,)))
    with pytest.raises(ValueError, match="outside"):
        attach(model, VAR(sink_dims=DIMS, layers=[9]))
    with pytest.raises(ValueError, match="fraction"):
        VAR(fraction=2.0)
    with pytest.raises(ValueError, match="sink_dims"):
        VAR(sink_dims="gpt-2")
    assert VAR(sink_dims="llama-2-7b").sink_dims == "llama-2-7b"


def test_text_sinks_alone_do_not_redistribute():
    model = tiny_llava("sdpa")
    with torch.no_grad():
        model.get_input_embeddings().weight[1, list(DIMS)] = 60.0  # BOS sink, no visual sink
    ids, mask, pix = tiny_inputs()
    real = mask.bool()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        with attach(model, VAR(sink_dims=DIMS, tau=TAU, min_image_attention=0.0)) as handle:
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
            category = handle.reducer.sinks(handle._adapter.state)[2]
    assert bool((category == 1).any()) and not bool((category == 2).any())
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=0)
