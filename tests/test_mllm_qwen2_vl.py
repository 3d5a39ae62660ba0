"""The reducers through ``attach`` on tiny random Qwen2-VL / Qwen2.5-VL models (dynamic resolution images,
videos, M-RoPE), against hand-built references that re-run the language model's layers."""

import pytest
import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from tests.test_mllm_tokens import FLASH
from visattn.mllm_tokens import (
    DART,
    VAR,
    VTCCLS,
    DyVTE,
    DyVTERouters,
    FastV,
    PyramidDrop,
    Reducer,
    SparseVLM,
    attach,
    calibrate_sink_dims,
)
from visattn.mllm_tokens._hf import cache_keyword
from visattn.mllm_tokens.qwen2_vl import media_sizes, media_units

IMG, VID, VSTART, VEND = 120, 121, 118, 119
MERGE, TEMPORAL, PATCH = 2, 2, 2
PATCH_DIM = 3 * TEMPORAL * PATCH * PATCH  # one flattened patch of pixel_values
FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
# per sample: the (kind, (t, h, w)) of its images and videos; samples differ in count and size
IMAGES_ONLY = [[("image", (1, 4, 6))], [("image", (1, 4, 4)), ("image", (1, 6, 4))]]
WITH_VIDEO = [[("video", (2, 4, 4)), ("image", (1, 4, 6))], [("image", (1, 4, 4))]]


def tiny_qwen(family: str = "qwen2_vl", attn: str = "eager", layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    text = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )  # fmt: skip
    common = dict(
        depth=2, num_heads=2, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL
    )
    if family == "qwen2_vl":
        vision = dict(common, embed_dim=32, hidden_size=64, mlp_ratio=2)
        config_cls, model_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    else:  # windows of 4x4 patches (2x2 tokens), full attention in the last block
        vision = dict(common, hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=8,
                      fullatt_block_indexes=[1], tokens_per_second=2)  # fmt: skip
        config_cls, model_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    cfg = config_cls(
        vision_config=vision, text_config=text, image_token_id=IMG, video_token_id=VID,
        vision_start_token_id=VSTART, vision_end_token_id=VEND,
    )  # fmt: skip
    if not attn.startswith("flash_attention"):
        cfg._attn_implementation = attn
        return model_cls(cfg).eval()
    model = model_cls(cfg).eval()  # flash-attn is not installed (``attn`` fixture): set it unchecked
    for c in (model.config, model.config.text_config, model.config.vision_config):
        c._attn_implementation = attn
    return model


def tokens(grid) -> int:
    t, h, w = grid
    return t * h * w // MERGE**2


def tiny_inputs(layout=IMAGES_ONLY, text_after=(5, 2), seed=1):
    """Left-padded batch: ``(inputs, rows)``; ``inputs`` holds input_ids, attention_mask,
    mm_token_type_ids, pixel_values(_videos) and image/video_grid_thw, ``rows`` each sample unpadded."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b, visuals in enumerate(layout):
        ids = [1] + torch.randint(3, 100, (3,), generator=g).tolist()
        media = {"image": [], "video": []}
        for kind, grid in visuals:
            ids += [VSTART] + [IMG if kind == "image" else VID] * tokens(grid) + [VEND]
            ids += torch.randint(3, 100, (2,), generator=g).tolist()
            media[kind].append(grid)
        ids += torch.randint(3, 100, (text_after[b % len(text_after)],), generator=g).tolist()
        pixels = {
            k: torch.randn(sum(t * h * w for t, h, w in v), PATCH_DIM, generator=g) for k, v in media.items()
        }
        rows.append(_sample_inputs(torch.tensor([ids]), media, pixels))
    length = max(r["input_ids"].shape[1] for r in rows)
    batch = {}
    for name in ("input_ids", "mm_token_type_ids"):
        batch[name] = torch.stack(
            [torch.nn.functional.pad(r[name][0], (length - r[name].shape[1], 0)) for r in rows]
        )
    batch["attention_mask"] = torch.stack(
        [torch.arange(length) >= length - r["input_ids"].shape[1] for r in rows]
    ).long()
    for name in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [r[name] for r in rows if name in r]
        if parts:
            batch[name] = torch.cat(parts)
    return batch, rows


def _sample_inputs(ids, media, pixels):
    out = {"input_ids": ids, "mm_token_type_ids": ((ids == IMG).long() + 2 * (ids == VID).long()).int()}
    if media["image"]:
        out["pixel_values"], out["image_grid_thw"] = pixels["image"], torch.tensor(media["image"])
    if media["video"]:
        out["pixel_values_videos"], out["video_grid_thw"] = pixels["video"], torch.tensor(media["video"])
    return out


def with_tokens(inputs: dict, new: torch.Tensor) -> dict:
    """A single-sample input with generated text tokens ``new [1, T]`` appended."""
    out = dict(inputs, input_ids=torch.cat([inputs["input_ids"], new], 1))
    out["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(new).int()], 1)
    return out


@torch.no_grad()
def lm_inputs(model, inputs):
    """``(inputs_embeds [1, L, D], position_ids [3, 1, L])`` that the stock model gives its language model
    for ``model(**inputs)``."""
    seen = {}

    def hook(module, args, kwargs):
        pos = kwargs["position_ids"]
        seen.update(embeds=kwargs["inputs_embeds"], pos=pos[-3:] if pos.shape[0] == 4 else pos)

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
    return seen["embeds"], seen["pos"]


@torch.no_grad()
def lm_decode_inputs(model, inputs, new):
    """The same at a cached decode step of token ``new [1, 1]`` after the prompt ``inputs`` (no
    attention_mask: the model numbers the step from its cache)."""
    cache = model(**inputs, use_cache=True)
    cache = cache["cache"] if "cache" in cache else cache["past_key_values"]
    return lm_inputs(model, {"input_ids": new, cache_keyword(model.forward): cache, "use_cache": True})


@torch.no_grad()
def manual_logits(model, embeds, pos, keep=None, from_layer=0):
    """Run the language model's layers on ``embeds [1, L, D]`` with M-RoPE ids ``pos [3, 1, L]``, keeping
    only positions ``keep`` from layer ``from_layer`` on (with their original ids); logits of the rest."""
    lm = model.model.language_model
    hidden = embeds
    for i, layer in enumerate(lm.layers):
        if keep is not None and i == from_layer:
            hidden, pos = hidden[:, keep], pos[:, :, keep]
        n = hidden.shape[1]
        mask = torch.full((n, n), torch.finfo(hidden.dtype).min).triu(1)[None, None]
        hidden = layer(hidden, attention_mask=mask, position_embeddings=lm.rotary_emb(hidden, pos))
    return model.lm_head(lm.norm(hidden))


def fastv_keep(eager, inputs, layer, keep, scoring="last", units=None):
    """Kept positions by FastV's rule from HF eager attention maps; ``units`` lists the visual tokens
    of each image (or video) of the sample."""
    with torch.no_grad():
        att = eager(**inputs, output_attentions=True).attentions[layer - 1]
    probs = att[0].mean(0)
    ids = inputs["input_ids"][0]
    visual = (ids == IMG) | (ids == VID)
    score = {"last": probs[-1], "all": probs.mean(0), "text": probs[~visual].mean(0)}[scoring]
    n_keep = sum(min(keep, n) if isinstance(keep, int) else max(1, round(n * keep)) for n in units)
    top = score.masked_fill(~visual, float("-inf")).topk(n_keep).indices
    kept = ~visual
    kept[top] = True
    return kept.nonzero()[:, 0]


def units_of(layout_row):
    """Visual tokens of each reducer "image" (an image or a whole video) of a sample, in order."""
    return [tokens(grid) for _, grid in layout_row]


# ---------------------------------------------------------------------------------------------- battery
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["eager", "sdpa", FLASH], indirect=True)
def test_keep_everything_matches_unattached_and_remove_restores(family, attn):
    model = tiny_qwen(family, attn)
    inputs, _ = tiny_inputs(WITH_VIDEO)
    real = inputs["attention_mask"].bool()
    n_visual = [8 + 6, 4]
    with torch.no_grad():
        ref = model(**inputs).logits
        reducers = (
            FastV(keep=1.0),
            FastV(keep=100, scoring="all"),
            VAR(sink_dims=(3, 7), tau=1.0, fraction=0.0),
        )
        for reducer in reducers:
            with attach(model, reducer) as handle:
                out = model(**inputs).logits
                assert [s["kept_per_layer"] for s in handle.stats] == [[n] * 4 for n in n_visual]
                assert handle.stats[0]["prefill_flops_saved"] == 0
            torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=0)
        handle = attach(model, FastV(keep=1))
        pruned = model(**inputs).logits
        assert [s["kept_per_layer"][-1] for s in handle.stats] == [2, 1]  # a video and an image; an image
        text_only = inputs["input_ids"][:, -3:]
        model(input_ids=text_only)
        assert handle.stats == []  # a prefill without images reports nothing
        handle.remove()
        assert pruned.shape[1] < ref.shape[1]
        assert torch.equal(model(**inputs).logits, ref)


@pytest.mark.parametrize(
    "family,attn,scoring,keep,video",
    [
        ("qwen2_vl", "sdpa", "last", 3, False),
        ("qwen2_vl", "eager", "all", 0.5, True),
        ("qwen2_vl", FLASH, "last", 2, True),
        ("qwen2_5_vl", "sdpa", "text", 0.5, True),
        ("qwen2_5_vl", FLASH, "last", 3, False),
    ],
    indirect=["attn"],
)
def test_fastv_matches_manual_rerun_with_original_mrope_ids(family, attn, scoring, keep, video):
    model, eager = tiny_qwen(family, attn), tiny_qwen(family, "eager")
    layout = WITH_VIDEO if video else IMAGES_ONLY
    inputs, rows = tiny_inputs(layout)
    with torch.no_grad(), attach(model, FastV(layer=2, keep=keep, scoring=scoring)) as handle:
        out = model(**inputs).logits
    for b, row in enumerate(rows):
        units = units_of(layout[b])
        kept = fastv_keep(eager, row, 2, keep, scoring, units)
        ref = manual_logits(eager, *lm_inputs(eager, row), kept, from_layer=2)
        torch.testing.assert_close(out[b, -ref.shape[1] :], ref[0], atol=1e-5, rtol=1e-4)
        n_kept = sum(min(keep, n) if isinstance(keep, int) else max(1, round(n * keep)) for n in units)
        assert handle.stats[b]["visual_tokens_in"] == sum(units)
        assert handle.stats[b]["kept_per_layer"] == [sum(units)] * 2 + [n_kept] * 2


def _greedy_reference(eager, row, kept_prompt, from_layer, steps):
    """Cache-free greedy decoding: every step re-runs the whole sequence (M-RoPE ids from the stock model)
    with the prompt's kept tokens and all new ones from ``from_layer`` on."""
    new = torch.zeros(1, 0, dtype=torch.long)
    length = row["input_ids"].shape[1]
    for _ in range(steps):
        embeds, pos = lm_inputs(eager, with_tokens(row, new))
        keep = torch.cat([kept_prompt, torch.arange(length, length + new.shape[1])])
        logits = manual_logits(eager, embeds, pos, keep, from_layer=from_layer)
        new = torch.cat([new, logits[:, -1:].argmax(-1)], 1)
    return new[0]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["eager", "sdpa", FLASH], indirect=True)
def test_generate_with_cache_matches_cache_free_reference(family, attn):
    model, eager = tiny_qwen(family, attn), tiny_qwen(family, "eager")
    inputs, rows = tiny_inputs(WITH_VIDEO)
    start = inputs["input_ids"].shape[1]
    gen = dict(inputs, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        with attach(model, FastV(layer=2, keep=2)) as handle:
            fastv = model.generate(**gen)[:, start:]
            stats = handle.stats
        with attach(model, DyVTE(exit_layer=1)) as handle:
            dyvte = model.generate(**gen)[:, start:]
            dyvte_nocache = model.generate(**gen, use_cache=False)[:, start:]
            # beam search: generate repeats each sample's images / videos per beam
            beams = dict(gen, num_beams=2, num_return_sequences=2)
            beam, beam_nocache = model.generate(**beams), model.generate(**beams, use_cache=False)
            beam_stats = handle.stats
    assert [s["kept_per_layer"] for s in stats] == [[14, 14, 4, 4], [4, 4, 2, 2]]  # generate's prefill
    assert torch.equal(dyvte, dyvte_nocache)
    assert beam.shape[0] == 4 and torch.equal(beam, beam_nocache)
    assert [s["visual_tokens_in"] for s in beam_stats] == [14, 14, 4, 4]
    for b, row in enumerate(rows):
        kept = fastv_keep(eager, row, 2, 2, "last", units_of(WITH_VIDEO[b]))
        assert torch.equal(fastv[b], _greedy_reference(eager, row, kept, 2, 4))
        ids = row["input_ids"][0]
        text = ((ids != IMG) & (ids != VID)).nonzero()[:, 0]
        assert torch.equal(dyvte[b], _greedy_reference(eager, row, text, 2, 4))


class DropOddPatches(Reducer):
    """A pre-LLM reduction (test-only): drop every visual token with an odd index inside its image."""

    def pre_llm(self, state):
        return ~state.visual | (state.patch_id % 2 == 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_pre_llm_reduction_keeps_mrope_ids_and_decode_continues_from_rope_deltas(family):
    model, eager = tiny_qwen(family, "sdpa"), tiny_qwen(family, "eager")
    inputs, rows = tiny_inputs(WITH_VIDEO)
    start = inputs["input_ids"].shape[1]
    kept = []
    for b, row in enumerate(rows):
        ids = row["input_ids"][0]
        visual = (ids == IMG) | (ids == VID)
        keep = ~visual
        keep[visual] = torch.cat([torch.arange(n) for n in units_of(WITH_VIDEO[b])]) % 2 == 0
        kept.append(keep.nonzero()[:, 0])
    with torch.no_grad(), attach(model, DropOddPatches()):
        out = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, start:]
        # a decode step by hand, without attention_mask or position_ids: the model numbers it from the
        # length of its KV cache, which the reduction shortened; the adapter restores the real positions
        row = rows[0]
        first = model(**row, use_cache=True)
        cache = first["cache"] if "cache" in first else first["past_key_values"]
        assert cache.get_seq_length() < row["input_ids"].shape[1]
        step = model(
            input_ids=generated[:1, :1], **{cache_keyword(model.forward): cache}, use_cache=True
        ).logits
    for b, row in enumerate(rows):
        embeds, pos = lm_inputs(eager, row)
        ref = manual_logits(eager, embeds[:, kept[b]], pos[:, :, kept[b]])
        torch.testing.assert_close(out[b, -ref.shape[1] :], ref[0], atol=1e-5, rtol=1e-4)
        assert torch.equal(generated[b], _greedy_reference(eager, row, kept[b], 0, 4))
    # the unreduced model's own numbering of that step (its KV cache holds the whole prompt)
    embeds, pos = lm_inputs(eager, rows[0])
    step_embeds, step_pos = lm_decode_inputs(eager, rows[0], generated[:1, :1])
    embeds, pos = (
        torch.cat([embeds[:, kept[0]], step_embeds], 1),
        torch.cat([pos[:, :, kept[0]], step_pos], 2),
    )
    ref = manual_logits(eager, embeds, pos)
    torch.testing.assert_close(step[0, -1], ref[0, -1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", FLASH], indirect=True)
def test_pre_llm_reduction_of_one_unpadded_prompt(attn):
    # no padding and no cache (use_cache=False): transformers reads generate's text position row for packed
    # sequences, so it must stay contiguous after the reduction
    model, eager = tiny_qwen("qwen2_vl", attn), tiny_qwen("qwen2_vl", "eager")
    _, rows = tiny_inputs(WITH_VIDEO)
    row = rows[0]
    ids = row["input_ids"][0]
    visual = (ids == IMG) | (ids == VID)
    keep = ~visual
    keep[visual] = torch.cat([torch.arange(n) for n in units_of(WITH_VIDEO[0])]) % 2 == 0
    with torch.no_grad(), attach(model, DropOddPatches()):
        cached, uncached = (
            model.generate(**row, max_new_tokens=4, do_sample=False, use_cache=c)[0, ids.shape[0] :]
            for c in (True, False)
        )
    reference = _greedy_reference(eager, row, keep.nonzero()[:, 0], 0, 4)
    assert torch.equal(cached, reference) and torch.equal(uncached, reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_restores_every_reducer_bit_identically(family):
    model = tiny_qwen(family, "sdpa")
    inputs, _ = tiny_inputs(WITH_VIDEO)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2)
        ref = model(**inputs).logits
        hooks = {
            m: (list(m._forward_pre_hooks), list(m._forward_hooks), m.__dict__.get("forward"))
            for m in model.modules()
        }
        reducers = (
            FastV(keep=2), VAR(sink_dims=(3, 7), tau=1.0), DyVTE(hypernet=DyVTERouters(64, 4, 8)),
            DyVTE(exit_layer=1), DropOddPatches(), DART(keep=0.5, pivots_image=1, pivots_text=1),
            PyramidDrop(layers=(1, 2)), SparseVLM(counts=(4, 2), layers=(0, 1)),
        )  # fmt: skip
        for reducer in reducers:
            with attach(model, reducer):
                model.generate(**inputs, max_new_tokens=2)
            assert torch.equal(model(**inputs).logits, ref)
            assert model.config.text_config._attn_implementation == "sdpa"
            for m, (pre, post, forward) in hooks.items():
                assert list(m._forward_pre_hooks) == pre and list(m._forward_hooks) == post
                assert m.__dict__.get("forward") is forward


def test_refusals_and_bad_inputs():
    model = tiny_qwen("qwen2_vl")
    with pytest.raises(ValueError, match=r"no \[CLS\] token"):
        attach(model, VTCCLS(keep=2, start_layer=0))
    with pytest.raises(ValueError, match=r"no \[CLS\] token"):
        attach(tiny_qwen("qwen2_5_vl"), VTCCLS(keep=2, start_layer=0))
    with pytest.raises(ValueError, match="outside"):
        attach(model, FastV(layer=4))
    with pytest.raises(ValueError, match="sink dimension"):
        attach(model, VAR(sink_dims="qwen2-7b"))  # Qwen2-7B's dims, outside the tiny hidden size
    sliding = tiny_qwen("qwen2_vl")
    sliding.config.text_config.layer_types = ["sliding_attention"] * 4
    with pytest.raises(ValueError, match="sliding"):
        attach(sliding, FastV())
    inputs, _ = tiny_inputs(IMAGES_ONLY)
    ids = inputs["input_ids"]
    with attach(model, FastV(keep=2)), pytest.raises(ValueError, match="labels"):
        model(**inputs, labels=ids)
    with attach(model, FastV(keep=2)) as handle:
        # the first image's grid now holds 4 tokens, the second 6 across two rows (the model's own M-RoPE
        # index fails on this first; explicit position_ids would reach the adapter)
        bad = {"image_grid_thw": inputs["image_grid_thw"][[1, 0, 2]]}
        with pytest.raises(ValueError, match="span two samples"):
            handle._adapter.segment(ids, ids == IMG, bad)
    image = inputs["input_ids"] == IMG
    grid = inputs["image_grid_thw"]
    with pytest.raises(ValueError, match="image_grid_thw describes 10"):
        media_units(image, media_sizes({"image_grid_thw": grid[:2]}, "image", MERGE), "image")
    with pytest.raises(ValueError, match="no image_grid_thw came"):
        media_units(image, media_sizes({}, "image", MERGE), "image")
    video = torch.tensor([[False, True, True, True, True, False], [True, True, False, False, False, False]])
    sizes = media_sizes({"video_grid_thw": torch.tensor([[2, 2, 4], [1, 4, 2]])}, "video", MERGE)
    unit, patch = media_units(video, sizes, "video")
    assert unit.tolist() == [[-1, 0, 0, 0, 0, -1], [1, 1, -1, -1, -1, -1]]
    assert patch.tolist() == [[-1, 0, 1, 2, 3, -1], [0, 1, -1, -1, -1, -1]]


# ---------------------------------------------------------------------------------------------- VAR
DIMS, TAU, SINK_PATCHES = (3, 7), 4.0, (1, 3)  # tiny hidden size: phi <= sqrt(64) = 8


def plant_sinks(model):
    """Massive activations on DIMS: in BOS's embedding and in two visual tokens of every image."""
    with torch.no_grad():
        model.get_input_embeddings().weight[1, list(DIMS)] = 60.0
    grids = []
    visual = model.model.visual

    def grid_hook(module, args, kwargs):
        grids[:] = [kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]]

    def merger_hook(module, args, output):
        output = output.clone()
        starts = (grids[0].prod(-1) // MERGE**2).cumsum(0) - grids[0].prod(-1) // MERGE**2
        for start in starts.tolist():
            for p in SINK_PATCHES:
                output[start + p, DIMS[p % 2]] = 80.0
        return output

    visual.register_forward_pre_hook(grid_hook, with_kwargs=True)
    visual.merger.register_forward_hook(merger_hook)


@torch.no_grad()
def var_reference(model, inputs, var):
    """Unbatched reference: the stock model with every attention computed as explicit probabilities,
    redistributed by the reference rule in VAR's layers from the sinks of the layer's input."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    from tests.test_mllm_var import redistributed

    ids = inputs["input_ids"]
    visual = (ids == IMG) | (ids == VID)
    inputs_of = {}

    def attention(module, q, k, v, mask, scaling=None, **kwargs):
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        n = q.shape[2]
        s = (q @ k.transpose(-1, -2)) * scaling
        probs = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        if module.layer_idx in range(2, len(lm.layers) - 1):
            probs = redistributed(probs, inputs_of[module.layer_idx], visual, var)
        return (probs @ v).transpose(1, 2), probs

    lm = model.model.language_model
    hooks = [
        layer.register_forward_pre_hook(
            lambda m, a, k, i=i: inputs_of.__setitem__(i, a[0] if a else k["hidden_states"]), with_kwargs=True
        )
        for i, layer in enumerate(lm.layers)
    ]
    AttentionInterface.register("var_reference", attention)
    AttentionMaskInterface.register("var_reference", ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    impl, lm.config._attn_implementation = lm.config._attn_implementation, "var_reference"
    try:
        return model(**inputs).logits
    finally:
        lm.config._attn_implementation = impl
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("attn", ["eager", "sdpa", FLASH], indirect=True)
def test_var_matches_reference_with_several_images(attn):
    model = tiny_qwen("qwen2_vl", attn)
    plant_sinks(model)
    inputs, rows = tiny_inputs(IMAGES_ONLY)
    real = inputs["attention_mask"].bool()
    var = VAR(sink_dims=DIMS, tau=TAU, min_image_attention=0.05)
    with torch.no_grad():
        ref = model(**inputs).logits
        with attach(model, var) as handle:
            out = model(**inputs).logits
            category = var.sinks(handle._adapter.state)[2]
            cached = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            uncached = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False)
    assert not torch.allclose(out[real], ref[real], atol=1e-3)
    assert torch.equal(cached, uncached)
    assert calibrate_sink_dims(model, **rows[1]) == DIMS
    for b, row in enumerate(rows):
        ids = inputs["input_ids"][b]
        starts = [int(s) for s in ((ids == IMG) & (ids.roll(1) == VSTART)).nonzero()[:, 0]]
        assert sorted((category[b] == 2).nonzero()[:, 0].tolist()) == [
            s + p for s in starts for p in SINK_PATCHES
        ]
        assert int((ids[category[b] == 1] == 1).sum()) == 1  # BOS is a text sink
        expected = var_reference(model, row, var)
        torch.testing.assert_close(out[b, real[b]], expected[0], atol=1e-5, rtol=1e-4)
