"""FastV and VTC-CLS through ``attach`` on a tiny random LLaVA, against hand-built references.

Also home of the tiny-model helpers the other ``test_mllm_*`` files import.
"""

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from visattn.mllm_tokens import VTCCLS, FastV, attach

IMG = 100  # image token id
PATCHES = 16  # 32x32 image, 8x8 patches
FLASH = "flash_attention_2"  # on the reference kernels of tests/flash_reference.py (``attn`` fixture)
ATTENTION = ["eager", "sdpa", FLASH]


def tiny_llava(attn: str = "eager", layers: int = 4, seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=32,
    )  # fmt: skip
    text = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=512,
    )  # fmt: skip
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMG, vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )  # fmt: skip
    if not attn.startswith("flash_attention"):
        cfg._attn_implementation = attn
        return LlavaForConditionalGeneration(cfg).eval()
    # flash-attn is not installed (see the ``attn`` fixture): choose it after building, unchecked
    model = LlavaForConditionalGeneration(cfg).eval()
    for c in (model.config, model.config.text_config, model.config.vision_config):
        c._attn_implementation = attn
    return model


def tiny_inputs(batch=2, images=1, text_after=(5, 2), seed=1):
    """Left-padded ``input_ids``/``attention_mask`` (samples of different lengths) and pixels."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(batch):
        ids = [1] + torch.randint(2, 100, (3,), generator=g).tolist()
        for _ in range(images):
            ids += [IMG] * PATCHES + torch.randint(2, 100, (2,), generator=g).tolist()
        ids += torch.randint(2, 100, (text_after[b % len(text_after)],), generator=g).tolist()
        rows.append(ids)
    length = max(len(r) for r in rows)
    ids = torch.zeros(batch, length, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, length - len(r) :] = torch.tensor(r)
        mask[b, length - len(r) :] = 1
    return ids, mask, torch.randn(batch * images, 3, 32, 32, generator=g)


def sample(ids, mask, pix, b, images=1):
    """Sample ``b`` without its padding, with its own images."""
    keep = mask[b].bool()
    return ids[b : b + 1, keep], pix[b * images : (b + 1) * images]


@torch.no_grad()
def manual_logits(model, embeds, keep=None, from_layer=0, positions=None):
    """Run the LLM on ``embeds [1, L, D]``, keeping only positions ``keep`` from layer ``from_layer``
    on (original position ids), and return the logits of the remaining tokens."""
    lm = model.model.language_model
    hidden = embeds
    pos = torch.arange(embeds.shape[1])[None] if positions is None else positions
    for i, layer in enumerate(lm.layers):
        if keep is not None and i == from_layer:
            hidden, pos = hidden[:, keep], pos[:, keep]
        n = hidden.shape[1]
        mask = torch.full((n, n), torch.finfo(hidden.dtype).min).triu(1)[None, None]
        hidden = layer(
            hidden, attention_mask=mask, position_embeddings=lm.rotary_emb(hidden, pos), position_ids=pos
        )
    return model.lm_head(lm.norm(hidden))


@torch.no_grad()
def embed(model, ids, pix):
    emb = model.get_input_embeddings()(ids)
    feats = torch.cat(list(model.model.get_image_features(pixel_values=pix).pooler_output))
    return emb.masked_scatter((ids == IMG)[..., None], feats)


def fastv_keep(eager_model, ids, pix, layer, keep_per_image, scoring="last"):
    """Kept positions by FastV's rule, from HF eager attention maps (output_attentions)."""
    with torch.no_grad():
        att = eager_model(input_ids=ids, pixel_values=pix, output_attentions=True).attentions[layer - 1]
    probs = att[0].mean(0)  # [L, L]
    visual = ids[0] == IMG
    score = {"last": probs[-1], "all": probs.mean(0), "text": probs[~visual].mean(0)}[scoring]
    n_keep = keep_per_image * int(visual.sum()) // PATCHES
    top = score.masked_fill(~visual, float("-inf")).topk(n_keep).indices
    kept = ~visual
    kept[top] = True
    return kept.nonzero()[:, 0]


def vtc_keep(eager_model, ids, pix, start, keep_per_image):
    """Kept positions by VTC-CLS's rule, from HF eager CLIP attention maps."""
    tower = eager_model.model.vision_tower
    with torch.no_grad():
        att = tower(pix, output_attentions=True).attentions
    score = sum(a.mean(1)[:, 0, 1:] for a in att[start:-1])  # [images, patches]
    chosen = torch.zeros_like(score, dtype=torch.bool)
    chosen.scatter_(1, score.topk(keep_per_image, dim=1).indices, True)
    visual = ids[0] == IMG
    kept = ~visual
    kept[visual] = chosen.flatten()
    return kept.nonzero()[:, 0]


@pytest.mark.parametrize("attn", ATTENTION, indirect=True)
def test_keep_everything_matches_unattached_and_remove_restores(attn):
    model = tiny_llava(attn)
    ids, mask, pix = tiny_inputs()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        ref_text_only = model(input_ids=ids[:, -3:]).logits
        for reducer in (FastV(keep=1.0), FastV(keep=PATCHES, scoring="all"), VTCCLS(keep=1.0, start_layer=1)):
            with attach(model, reducer) as handle:
                out = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
                assert handle.stats[0]["kept_per_layer"] == [PATCHES] * 4
                assert handle.stats[0]["prefill_flops_saved"] == 0
            real = mask.bool()  # padded rows are garbage in both; sdpa and eager fill them differently
            torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=0)
        handle = attach(model, FastV(keep=3))
        pruned = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        assert len(handle.stats) == 2
        torch.testing.assert_close(model(input_ids=ids[:, -3:]).logits, ref_text_only, atol=1e-5, rtol=0)
        assert handle.stats == []  # a prefill without images reports nothing (no stale stats)
        handle.remove()
        assert pruned.shape[1] < ref.shape[1]
        assert torch.equal(model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits, ref)


def layer_flops_by_hand(n, d=64, d_kv=32, m=128):
    """One tiny-LLaMA decoder layer on ``n`` tokens: projections, attention, gated MLP (2 per MAC)."""
    return 2 * n * d * (2 * d + 2 * d_kv) + 4 * n * n * d + 6 * n * d * m


@pytest.mark.parametrize(
    "attn,scoring,images",
    [("sdpa", "last", 1), ("eager", "all", 1), ("sdpa", "last", 2), ("sdpa", "text", 2), (FLASH, "last", 2)],
    indirect=["attn"],
)
def test_fastv_matches_manual_rerun_of_later_layers(attn, scoring, images):
    model, eager = tiny_llava(attn), tiny_llava("eager")
    ids, mask, pix = tiny_inputs(images=images)
    with torch.no_grad(), attach(model, FastV(layer=2, keep=5, scoring=scoring)) as handle:
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
    for b in range(2):
        sid, spix = sample(ids, mask, pix, b, images)
        kept = fastv_keep(eager, sid, spix, 2, 5, scoring)
        ref = manual_logits(eager, embed(eager, sid, spix), kept, from_layer=2)
        torch.testing.assert_close(out[b, -ref.shape[1] :], ref[0], atol=1e-5, rtol=1e-4)
        stats = handle.stats[b]
        assert stats["visual_tokens_in"] == PATCHES * images
        assert stats["kept_per_layer"] == [PATCHES * images] * 2 + [5 * images] * 2
        n, pruned = int(mask[b].sum()), (PATCHES - 5) * images
        saved = 2 * (layer_flops_by_hand(n) - layer_flops_by_hand(n - pruned))  # layers 2 and 3
        assert stats["prefill_flops"] == 4 * layer_flops_by_hand(n)
        assert stats["prefill_flops_saved"] == pytest.approx(saved, rel=1e-12)


@pytest.mark.parametrize("attn,images", [("sdpa", 1), ("eager", 2), (FLASH, 2)], indirect=["attn"])
def test_vtc_cls_matches_hand_shortened_sequence(attn, images):
    model, eager = tiny_llava(attn), tiny_llava("eager")
    ids, mask, pix = tiny_inputs(images=images)
    with torch.no_grad(), attach(model, VTCCLS(keep=4, start_layer=1)) as handle:
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
    for b in range(2):
        sid, spix = sample(ids, mask, pix, b, images)
        kept = vtc_keep(eager, sid, spix, 1, 4)
        ref = manual_logits(eager, embed(eager, sid, spix)[:, kept])  # contiguous positions
        torch.testing.assert_close(out[b, -ref.shape[1] :], ref[0], atol=1e-5, rtol=1e-4)
        assert handle.stats[b]["kept_per_layer"] == [4 * images] * 4


def _greedy_reference(eager, sid, spix, kept_prompt, from_layer, steps, contiguous=False):
    tokens = sid
    for _ in range(steps):
        emb = embed(eager, tokens, spix)
        new = torch.arange(sid.shape[1], tokens.shape[1])
        keep = torch.cat([kept_prompt, new])
        if contiguous:
            logits = manual_logits(eager, emb[:, keep])
        else:
            logits = manual_logits(eager, emb, keep, from_layer=from_layer)
        tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
    return tokens[0, sid.shape[1] :]


@pytest.mark.parametrize("attn", ATTENTION, indirect=True)
def test_generate_with_cache_matches_cache_free_reference(attn):
    model, eager = tiny_llava(attn), tiny_llava("eager")
    ids, mask, pix = tiny_inputs()
    gen = dict(input_ids=ids, attention_mask=mask, pixel_values=pix, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        with attach(model, FastV(layer=2, keep=4)):
            fastv = model.generate(**gen)[:, ids.shape[1] :]
            sampled = model.generate(**{**gen, "do_sample": True, "top_k": 1})[:, ids.shape[1] :]
        with attach(model, VTCCLS(keep=4, start_layer=1)) as handle:
            vtc = model.generate(**gen)[:, ids.shape[1] :]
            after_generate = handle.stats  # describes generate's prefill
            model(input_ids=ids, attention_mask=mask, pixel_values=pix)
            assert after_generate == handle.stats and len(after_generate) == 2
            vtc_nocache = model.generate(**gen, use_cache=False)[:, ids.shape[1] :]
            # sampling and beam search (generate encodes the images once, then repeats them per beam)
            sampled_vtc = []
            for cache in (True, False):
                torch.manual_seed(5)
                sampled_vtc.append(model.generate(**{**gen, "do_sample": True}, use_cache=cache))
            beams = dict(gen, num_beams=3, num_return_sequences=2)
            beam = model.generate(**beams)
            beam_nocache = model.generate(**beams, use_cache=False)
    assert torch.equal(sampled, fastv)
    assert torch.equal(vtc, vtc_nocache)
    assert torch.equal(*sampled_vtc)
    assert beam.shape[0] == 4 and torch.equal(beam, beam_nocache)
    for b in range(2):
        sid, spix = sample(ids, mask, pix, b)
        ref = _greedy_reference(eager, sid, spix, fastv_keep(eager, sid, spix, 2, 4), 2, 4)
        assert torch.equal(fastv[b], ref)
        ref = _greedy_reference(eager, sid, spix, vtc_keep(eager, sid, spix, 1, 4), 0, 4, contiguous=True)
        assert torch.equal(vtc[b], ref)


def test_invalid_arguments():
    model = tiny_llava()
    with pytest.raises(ValueError, match="layer"):
        FastV(layer=0)
    with pytest.raises(ValueError, match="scoring"):
        FastV(scoring="first")
    with pytest.raises(ValueError, match="fraction"):
        FastV(keep=1.5)
    with pytest.raises(ValueError, match="outside"):
        attach(model, FastV(layer=4))
    with pytest.raises(ValueError, match="visual tokens per image"):
        attach(model, FastV(keep=PATCHES + 1))
    with pytest.raises(ValueError, match="start_layer"):
        attach(model, VTCCLS(keep=4, start_layer=3))
    with pytest.raises(ValueError, match="reduce"):
        VTCCLS(reduce="mean")
    with attach(model, FastV()), pytest.raises(ValueError, match="already"):
        attach(model, FastV())
    ids, mask, pix = tiny_inputs()
    with attach(model, FastV(keep=4)), pytest.raises(ValueError, match="labels"):
        model(input_ids=ids, attention_mask=mask, pixel_values=pix, labels=ids)
    right = torch.stack([row.roll(-int((row == 0).sum())) for row in mask])  # right padding
    with attach(model, FastV(keep=4)), pytest.raises(ValueError, match="left padding"):
        model(input_ids=ids, attention_mask=right, pixel_values=pix)
    with attach(model, FastV(keep=4)), pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=embed(model, ids, pix), attention_mask=mask)
    with attach(model, FastV(keep=4)), pytest.raises(ValueError, match="static"):
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=pix,
            max_new_tokens=1,
            cache_implementation="static",
        )
    flex = tiny_llava()
    flex.config.text_config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="flex_attention"):
        attach(flex, FastV())
    with pytest.raises(ValueError, match="no adapter"):
        attach(torch.nn.Linear(2, 2), FastV())


def test_remove_restores_every_reducer_bit_identically():
    from visattn.mllm_tokens import VAR, DyVTE, DyVTERouters

    model = tiny_llava("sdpa")
    ids, mask, pix = tiny_inputs()
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, pixel_values=pix, max_new_tokens=2)
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        # transformers' own output-capturing hooks and forward wrappers stay as they are
        hooks = {
            m: (list(m._forward_pre_hooks), list(m._forward_hooks), m.__dict__.get("forward"))
            for m in model.modules()
        }
        reducers = (
            FastV(keep=3), VTCCLS(keep=3, start_layer=1), VAR(sink_dims=(3, 7), tau=1.0),
            DyVTE(hypernet=DyVTERouters(64, 4, 8)), DyVTE(exit_layer=1),
        )  # fmt: skip
        for reducer in reducers:
            with attach(model, reducer):
                model.generate(input_ids=ids, attention_mask=mask, pixel_values=pix, max_new_tokens=2)
            assert torch.equal(model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits, ref)
            for m, (pre, post, forward) in hooks.items():
                assert list(m._forward_pre_hooks) == pre and list(m._forward_hooks) == post
                assert m.__dict__.get("forward") is forward


def test_transformers_outside_the_declared_range_is_refused(monkeypatch):
    import re
    from pathlib import Path

    import transformers

    from visattn.mllm_tokens import _hf

    low, high = _hf.SUPPORTED
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    declared = re.findall(r'"(transformers[^"]*)"', pyproject)
    assert declared == [f"transformers>={low.removesuffix('.0')},<{high.removesuffix('.0')}"]
    _hf.check_version(transformers.__version__)  # the installed release is inside
    for version in (low, "5.39.9", "5.24.0.dev0"):
        _hf.check_version(version)
    for version in ("5.3.9", high, "6.0.0", "4.57.1"):
        with pytest.raises(ValueError, match=f"transformers {version} is outside"):
            _hf.check_version(version)
    monkeypatch.setattr(transformers, "__version__", "5.3.0")
    with pytest.raises(ValueError, match=r"transformers 5.3.0 is outside .*>=5.4.0,<5.40.0"):
        attach(tiny_llava(), FastV())


def test_attention_runs_through_the_registered_interface_and_remove_restores_the_config():
    """The layers a reducer needs run visattn's AttentionInterface function (not a patched forward);
    every other layer, and everything after remove(), runs transformers' own implementation."""
    from transformers import AttentionInterface

    model = tiny_llava("sdpa")
    ids, mask, pix = tiny_inputs()
    calls = []
    with attach(model, FastV(layer=2, keep=4)) as handle:
        impl = model.config.text_config._attn_implementation
        assert impl == "visattn_sdpa" and impl in AttentionInterface()
        routed = AttentionInterface()[impl]

        def spy(module, *args, **kwargs):
            calls.append(module.layer_idx)
            return routed(module, *args, **kwargs)

        AttentionInterface.register(impl, spy)
        try:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask, pixel_values=pix)
        finally:
            AttentionInterface.register(impl, routed)
        assert sorted(handle.stats[0]["kept_per_layer"]) == [4, 4, PATCHES, PATCHES]
    assert calls == [0, 1, 2, 3]
    assert model.config.text_config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("FastV", dict(keep=17)),
        ("VTCCLS", dict(keep=17, start_layer=1)),
        ("DivPrune", dict(keep=17)),
        ("DART", dict(keep=16)),  # plus its 4 image pivots
        ("VisionZip", dict(dominant=10, contextual=7)),
        ("SparseVLM", dict(tokens=64)),
        ("SparseVLM", dict(counts=(17, 8), layers=(1, 2))),
    ],
)
def test_every_budget_above_the_visual_tokens_is_the_same_error(name, kwargs):
    """16 visual tokens per image: a budget that keeps more (SparseVLM once kept all 16, 0 FLOPs saved)."""
    from visattn import mllm_tokens

    model = tiny_llava()
    message = "is more than the 16 visual tokens per image; lower it to at most 16"
    with pytest.raises(ValueError, match=message):
        attach(model, getattr(mllm_tokens, name)(**kwargs))
    assert getattr(model, "_visattn_handle", None) is None


def test_a_removed_handle_cannot_be_entered_again():
    model = tiny_llava()
    handle = attach(model, FastV(keep=4))
    with handle:
        pass
    with pytest.raises(ValueError, match="removed.*attach"), handle:
        pass
    handle.remove()  # removing twice stays harmless
