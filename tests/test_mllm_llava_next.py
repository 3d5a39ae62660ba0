"""The reducers on a tiny random LLaVA-NeXT (anyres tiles, unpadding, row-end newline tokens), against
references that find the newline tokens and each token's crop and patch on their own (by comparing
features), not through the adapter's layout."""

import inspect

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

from tests.test_mllm_tokens import ATTENTION, FLASH, manual_logits
from visattn.mllm_tokens import VAR, VTCCLS, DyVTE, FastV, attach
from visattn.mllm_tokens.fastv import keep_budgets

IMG = 100
PATCHES = 16  # a 32x32 crop in 8x8 patches
CROPS = 5  # base view + a 2x2 grid of tiles (the only grid point is 64x64)
# image sizes (H, W) of the two samples: one wide image; a square and a tall one
SIZES = [[(32, 64)], [(64, 64), (64, 32)]]
# by hand: (32, 64) unpads the 8x8 tile grid to rows 2..5 -> 16 base + 4 x 8 tokens, 4 newlines, each tile
# 8 tokens; (64, 64) keeps all 8x8 (8 newlines); (64, 32) keeps columns 2..5 (8 newlines), tiles 8 each
VISUAL = [[48], [80, 48]]
CROP_TOKENS = [[16, 8, 8, 8, 8], [16] * 5 + [16, 8, 8, 8, 8]]


def tiny_next(attn: str = "eager", layers: int = 4, seed: int = 0) -> LlavaNextForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=32,
    )  # fmt: skip
    text = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=512,
    )  # fmt: skip
    cfg = LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_id=IMG, vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_grid_pinpoints=[[64, 64]],
    )  # fmt: skip
    model = LlavaNextForConditionalGeneration(cfg).eval()
    for c in (model.config, model.config.text_config, model.config.vision_config):
        c._attn_implementation = attn  # flash: on tests/flash_reference.py (the ``attn`` fixture)
    return model


@torch.no_grad()
def image_features(model, pix, sizes) -> list[torch.Tensor]:
    return list(model.model.get_image_features(pixel_values=pix, image_sizes=sizes).pooler_output)


def tiny_inputs(model, seed=1):
    """Left-padded batch of 2: one image (4 newlines) / two images (16 newlines), text after."""
    g = torch.Generator().manual_seed(seed)
    pix = torch.randn(3, CROPS, 3, 32, 32, generator=g)
    sizes = torch.tensor([s for row in SIZES for s in row])
    lengths = [len(f) for f in image_features(model, pix, sizes)]
    rows, image = [], 0
    for b, row_sizes in enumerate(SIZES):
        ids = [1] + torch.randint(2, 100, (3,), generator=g).tolist()
        for _ in row_sizes:
            ids += [IMG] * lengths[image] + torch.randint(2, 100, (2,), generator=g).tolist()
            image += 1
        rows.append(ids + torch.randint(2, 100, (4 - 2 * b,), generator=g).tolist())
    return dict(left_pad(rows), pixel_values=pix, image_sizes=sizes)


def left_pad(rows: list[list[int]]) -> dict:
    """``input_ids`` / ``attention_mask`` of token lists of different lengths, padded on the left."""
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, length - len(r) :] = torch.tensor(r)
        mask[b, length - len(r) :] = 1
    return dict(input_ids=ids, attention_mask=mask)


def sample(inputs, b):
    """Sample ``b`` without padding, with its own images."""
    keep = inputs["attention_mask"][b].bool()
    first = sum(len(s) for s in SIZES[:b])
    images = slice(first, first + len(SIZES[b]))
    return inputs["input_ids"][b : b + 1, keep], inputs["pixel_values"][images], inputs["image_sizes"][images]


@torch.no_grad()
def reference_layout(model, ids, pix, sizes):
    """``(embeds [1, L, D], visual [L], crop [L], patch [L])`` of one sample: newline tokens are the
    features equal to ``image_newline``; every other image feature is matched to the crop and patch
    whose projected CLIP feature it equals (-1 elsewhere)."""
    feats = torch.cat(image_features(model, pix, sizes))
    embeds = model.get_input_embeddings()(ids).masked_scatter((ids == IMG)[..., None], feats)
    newline = (feats == model.model.image_newline).all(-1)
    hidden = model.model.vision_tower(pix.flatten(0, 1), output_hidden_states=True).hidden_states[-2]
    projected = model.model.multi_modal_projector(hidden[:, 1:]).flatten(0, 1)  # [crops * P, D]
    dist = torch.cdist(feats[~newline], projected)
    assert bool((dist.amin(1) < 1e-3).all())  # equal features (cdist's own rounding aside)
    source = dist.argmin(1)
    visual = ids[0] == IMG
    where = visual.nonzero()[:, 0][~newline]
    visual[visual.clone()] = ~newline
    crop = torch.full_like(ids[0], -1)
    patch = torch.full_like(ids[0], -1)
    crop[where], patch[where] = source // PATCHES, source % PATCHES
    return embeds, visual, crop, patch


def crop_budgets(keep, b):
    return keep_budgets(keep, torch.tensor(CROP_TOKENS[b]), PATCHES)


@torch.no_grad()
def fastv_keep(eager, ids, pix, sizes, layer, keep, b, scoring="last"):
    """Kept positions by FastV's rule over the non-newline image tokens (HF eager attention maps)."""
    _, visual, _, _ = reference_layout(eager, ids, pix, sizes)
    att = eager(input_ids=ids, pixel_values=pix, image_sizes=sizes, output_attentions=True).attentions
    return fastv_rule(att[layer - 1], visual, scoring, int(crop_budgets(keep, b).sum()))


def fastv_rule(attention: torch.Tensor, visual: torch.Tensor, scoring: str, count: int) -> torch.Tensor:
    """Positions FastV keeps: every non-visual token and the ``count`` visual ones that received the
    most head-mean attention (``attention [1, H, L, L]`` of layer K-1) from the last / all queries."""
    probs = attention[0].mean(0)
    score = {"last": probs[-1], "all": probs.mean(0)}[scoring]
    kept = ~visual
    kept[score.masked_fill(~visual, float("-inf")).topk(count).indices] = True
    return kept.nonzero()[:, 0]


@torch.no_grad()
def vtc_keep(eager, ids, pix, sizes, start, keep, b):
    """Kept positions by VTC-CLS: per crop, its own [CLS] row ranks the patches that reached the prompt."""
    _, visual, crop, patch = reference_layout(eager, ids, pix, sizes)
    att = eager.model.vision_tower(pix.flatten(0, 1), output_attentions=True).attentions
    score = sum(a.mean(1)[:, 0, 1:] for a in att[start:-1])  # [crops, P]
    kept = ~visual
    for c, budget in enumerate(crop_budgets(keep, b).tolist()):
        mine = (crop == c).nonzero()[:, 0]
        kept[mine[score[c, patch[mine]].topk(budget).indices]] = True
    return kept.nonzero()[:, 0]


@torch.no_grad()
def greedy_reference(eager, ids, pix, sizes, kept_prompt, steps, from_layer=0, contiguous=False):
    tokens = ids
    for _ in range(steps):
        emb, _, _, _ = reference_layout(eager, tokens, pix, sizes)
        keep = torch.cat([kept_prompt, torch.arange(ids.shape[1], tokens.shape[1])])
        if contiguous:
            logits = manual_logits(eager, emb[:, keep])
        else:
            logits = manual_logits(eager, emb, keep, from_layer=from_layer)
        tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
    return tokens[0, ids.shape[1] :]


@pytest.mark.parametrize("attn", ATTENTION, indirect=True)
def test_keep_everything_matches_unattached_and_remove_restores(attn):
    model = tiny_next(attn)
    inputs = tiny_inputs(model)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref = model(**inputs).logits
        for reducer in (FastV(keep=1.0), FastV(keep=PATCHES, scoring="all"), VTCCLS(keep=1.0, start_layer=1)):
            with attach(model, reducer) as handle:
                out = model(**inputs).logits
                assert [s["visual_tokens_in"] for s in handle.stats] == [48, 128]  # newlines not counted
                assert [s["kept_per_layer"] for s in handle.stats] == [[48] * 4, [128] * 4]
            torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=0)
        with attach(model, FastV(keep=3)):
            pruned = model(**inputs).logits
            assert "get_image_features" in model.model.__dict__
        assert "get_image_features" not in model.model.__dict__
        assert pruned.shape[1] < ref.shape[1]
        assert torch.equal(model(**inputs).logits, ref)


@pytest.mark.parametrize(
    "attn,scoring,keep", [("sdpa", "last", 0.5), ("eager", "all", 4), (FLASH, "last", 4)], indirect=["attn"]
)
def test_fastv_matches_manual_rerun_of_later_layers(attn, scoring, keep):
    model, eager = tiny_next(attn), tiny_next("eager")
    inputs = tiny_inputs(model)
    with torch.no_grad(), attach(model, FastV(layer=2, keep=keep, scoring=scoring)) as handle:
        out = model(**inputs).logits
    # by hand: keep=0.5 halves every crop (24 | 40 + 24); keep=4 is 4 per 16-token crop, 2 per 8-token tile
    expected = {0.5: [24, 64], 4: [12, 32]}[keep]
    for b in range(2):
        ids, pix, sizes = sample(inputs, b)
        kept = fastv_keep(eager, ids, pix, sizes, 2, keep, b, scoring)
        embeds = reference_layout(eager, ids, pix, sizes)[0]
        ref = manual_logits(eager, embeds, kept, from_layer=2)
        torch.testing.assert_close(out[b, -ref.shape[1] :], ref[0], atol=1e-5, rtol=1e-4)
        assert handle.stats[b]["kept_per_layer"] == [sum(VISUAL[b])] * 2 + [expected[b]] * 2


@pytest.mark.parametrize("attn", ["sdpa", FLASH], indirect=True)
def test_vtc_cls_ranks_each_crop_by_its_own_cls_row(attn):
    model, eager = tiny_next(attn), tiny_next("eager")
    inputs = tiny_inputs(model)
    with torch.no_grad(), attach(model, VTCCLS(keep=4, start_layer=1)) as handle:
        out = model(**inputs).logits
    for b in range(2):
        ids, pix, sizes = sample(inputs, b)
        kept = vtc_keep(eager, ids, pix, sizes, 1, 4, b)
        embeds = reference_layout(eager, ids, pix, sizes)[0]
        ref = manual_logits(eager, embeds[:, kept])  # contiguous positions
        torch.testing.assert_close(out[b, -ref.shape[1] :], ref[0], atol=1e-5, rtol=1e-4)
        assert handle.stats[b]["kept_per_layer"] == [[12, 32][b]] * 4


@pytest.mark.parametrize("attn", ["sdpa", FLASH], indirect=True)
def test_generate_with_cache_matches_cache_free_reference(attn):
    model, eager = tiny_next(attn), tiny_next("eager")
    inputs = tiny_inputs(model)
    gen = dict(inputs, max_new_tokens=3, do_sample=False)
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        plain = model.generate(**gen)
        with attach(model, FastV(layer=2, keep=4)) as handle:
            fastv = model.generate(**gen)[:, n:]
            assert [s["kept_per_layer"] for s in handle.stats] == [[48, 48, 12, 12], [128, 128, 32, 32]]
        with attach(model, VTCCLS(keep=4, start_layer=1)) as handle:
            vtc = model.generate(**gen)[:, n:]
            assert [s["kept_per_layer"] for s in handle.stats] == [[12] * 4, [32] * 4]
            # generate encodes the images once and repeats them per returned sequence. Releases before
            # generate's mm_encoder_outputs (5.4) repeat image by image, which misplaces the images of a
            # sample with several: there only the one-image sample
            per_sample = "mm_encoder_outputs" in inspect.signature(model.forward).parameters
            ids, pix, sizes = sample(inputs, 0)
            one = dict(input_ids=ids, pixel_values=pix, image_sizes=sizes)
            beams = dict(inputs if per_sample else one, max_new_tokens=3, num_beams=2, num_return_sequences=2)
            assert torch.equal(model.generate(**beams), model.generate(**beams, use_cache=False))
            kept = [[12] * 4] * 2 + ([[32] * 4] * 2 if per_sample else [])
            assert [s["kept_per_layer"] for s in handle.stats] == kept
        for reducer in (DyVTE(exit_layer=1), VAR(sink_dims=(3, 7), tau=1.0)):
            with attach(model, reducer):
                cached = model.generate(**gen)
                assert torch.equal(cached, model.generate(**gen, use_cache=False))
        assert torch.equal(model.generate(**gen), plain)  # every reducer removed without a trace
        configs = (model.config.text_config, model.config.vision_config)
        assert [c._attn_implementation for c in configs] == [attn, attn]
    for b in range(2):
        ids, pix, sizes = sample(inputs, b)
        kept = fastv_keep(eager, ids, pix, sizes, 2, 4, b)
        assert torch.equal(fastv[b], greedy_reference(eager, ids, pix, sizes, kept, 3, from_layer=2))
        kept = vtc_keep(eager, ids, pix, sizes, 1, 4, b)
        assert torch.equal(vtc[b], greedy_reference(eager, ids, pix, sizes, kept, 3, contiguous=True))


def test_dyvte_removes_the_visual_tokens_and_keeps_the_newlines():
    model = tiny_next("sdpa")
    inputs = tiny_inputs(model)
    with torch.no_grad(), attach(model, DyVTE(exit_layer=1)) as handle:
        model(**inputs)
        where = handle.output_positions
    assert [s["kept_per_layer"] for s in handle.stats] == [[48, 48, 0, 0], [128, 128, 0, 0]]
    for b in range(2):
        kept_ids = inputs["input_ids"][b, where[b][where[b] >= 0]]
        assert int((kept_ids == IMG).sum()) == [4, 16][b]  # the row-end newline tokens


def test_invalid_arguments():
    model = tiny_next()
    with pytest.raises(ValueError, match="visual tokens per image"):
        attach(model, FastV(keep=PATCHES + 1))
    full = tiny_next()
    full.config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        attach(full, FastV())
    inputs = tiny_inputs(model)
    wrong = dict(inputs, image_sizes=torch.tensor([[64, 64]] * 3))  # more tokens than the prompt has
    with attach(model, FastV()), pytest.raises(ValueError, match="image tokens"):
        model(**wrong)
